"""inference/serve.py, a real uvicorn server on the tiny model, driven by the official `openai` client
(streaming and not) and by raw HTTP for the bad requests; answers are checked against the engine."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatkit.chat import ChatEngine, GenerationParams, StreamInfo
from chatkit.conversation import Message

openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")

N = 8
GREEDY = GenerationParams(max_new_tokens=N, sample=False)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.key, max_retries=0, timeout=60)


def chat(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def msgs(*texts: str) -> list[Message]:
    return [Message(m["role"], m["content"]) for m in chat(*texts)]


def test_health_models_and_loopback_bind(served, client):
    r = httpx.get(served.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert f"Uvicorn running on {served.url}" in served.log.read_text()  # 127.0.0.1 unless told otherwise


def test_api_key_is_required(served):
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": chat("hi")})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


def test_chat_completion_equals_engine_reply(client, tiny_engine: ChatEngine):
    for texts in [("hello",), ("What is 2 + 3?", "5", "And 4 + 4?")]:
        r = client.chat.completions.create(model="tiny", messages=chat(*texts), max_tokens=N, temperature=0)
        info = StreamInfo()
        expected = "".join(tiny_engine.stream(msgs(*texts), GREEDY, info=info))
        assert r.choices[0].message.content == expected
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ("length" if info.finish_reason == "length" else "stop")
        assert r.usage.prompt_tokens == info.prompt_tokens
        assert r.usage.completion_tokens == info.completion_tokens


def test_chat_streaming_equals_engine_reply(client, tiny_engine: ChatEngine):
    stream = client.chat.completions.create(
        model="tiny", messages=chat("hello"), max_tokens=N, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # it really streams
    assert "".join(deltas) == tiny_engine.reply(msgs("hello"), GREEDY)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format_ends_with_done(served):
    body = {"messages": chat("hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {served.key}"}) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions_continue_raw_text(client, tiny_engine: ChatEngine):
    prompt = "Reverse the words: red fish blue"
    expected = "".join(tiny_engine.complete(prompt, GenerationParams(max_new_tokens=6, sample=False)))
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == expected
    streamed = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expected


def test_stop_parameter_cuts_the_reply(client, tiny_engine: ChatEngine):
    full = tiny_engine.reply(msgs("hello"), GREEDY)
    stop = next(full[i : i + 2] for i in range(2, len(full) - 1) if full.find(full[i : i + 2]) == i)
    r = client.chat.completions.create(
        model="tiny", messages=chat("hello"), max_tokens=N, temperature=0, stop=[stop]
    )
    expected = "".join(tiny_engine.stream(msgs("hello"), GREEDY, stop=[stop]))
    assert r.choices[0].message.content == expected and stop not in expected
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def ask(seed):
        return (
            client.chat.completions.create(
                model="tiny", messages=chat("hello"), max_tokens=N, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert ask(3) == ask(3)


def test_eight_concurrent_clients_get_their_own_answers(client, tiny_engine: ChatEngine):
    prompts = [f"What is {i} + {i + 3}?" for i in range(8)]
    expected = [tiny_engine.reply(msgs(p), GREEDY) for p in prompts]
    assert len(set(expected)) > 1  # different prompts, different answers: mixing would show

    def ask(i: int) -> str:
        if i % 2:  # half stream, half not
            s = client.chat.completions.create(
                model="tiny", messages=chat(prompts[i]), max_tokens=N, temperature=0, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        r = client.chat.completions.create(
            model="tiny", messages=chat(prompts[i]), max_tokens=N, temperature=0
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == expected


BAD = [
    (b'{"messages": [', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": "hi"}', "messages"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
        "last message",
    ),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "system"),
]


@pytest.mark.parametrize(("body", "says"), BAD, ids=range(len(BAD)))
def test_bad_chat_requests_get_400_and_the_server_goes_on(served, body: bytes, says: str):
    headers = {"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"}
    r = httpx.post(served.url + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"] and err["type"] == "invalid_request_error"


def test_prompt_longer_than_context_is_refused(client, served):
    huge = "word " * 600
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=chat(huge), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=huge, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=-1)
    # Still serving, and correctly.
    assert httpx.get(served.url + "/health").json()["waiting"] == 0
    assert client.chat.completions.create(model="tiny", messages=chat("hi"), max_tokens=2).choices


def test_page_is_served(served):
    r = httpx.get(served.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ('id="send"', 'id="stop"', 'id="regen"', 'id="reset"', 'id="temperature"'):
        assert element in r.text


def test_engine_cancel_stops_generation(tiny_engine: ChatEngine):
    """What a closed stream does to its job: the engine stops after the current token."""
    engine = ChatEngine(tiny_engine.model, tiny_engine.tokenizer,
                        dataclasses.replace(tiny_engine.template, stop_strings=()), tiny_engine.device)  # fmt: skip
    engine.eos_ids = set()
    cancel, info = threading.Event(), StreamInfo()
    pieces = []
    for piece in engine.stream(
        msgs("hello"), GenerationParams(max_new_tokens=200, sample=False), cancel=cancel, info=info
    ):
        pieces.append(piece)
        cancel.set()
    assert info.finish_reason == "cancelled" and info.completion_tokens < 200


def test_every_api_route_requires_the_key_and_bad_keys_are_401(tiny_engine: ChatEngine):
    """The key is a dependency of the /v1 router: a route added there cannot forget it."""
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app
    from chatkit.serve.routes import api as v1

    app = create_app(tiny_engine, ServerConfig("tiny", GREEDY, api_key="k"))
    api = [(m, r.path) for r in v1.routes if isinstance(r, APIRoute) for m in r.methods]
    assert {p for _, p in api} == {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    with TestClient(app) as c:
        for method, path in api:
            for auth in (None, b"Bearer wrong", b"Basic k", "Bearer \xe9t\xe9".encode("latin-1")):
                r = c.request(method, path, headers={"Authorization": auth} if auth else {}, content=b"{}")
                assert r.status_code == 401, (method, path, auth, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # open


def test_a_chat_too_long_is_refused_with_the_code_the_page_reads(served, tiny_engine: ChatEngine):
    """The server measures the prompt with the engine and refuses, never trims: the page drops turns."""
    long = "word " * 200
    texts = (long, "ok", long, "ok", "hi")
    assert tiny_engine.prompt_length(msgs(*texts)) + N > tiny_engine.context_length
    headers = {"Authorization": f"Bearer {served.key}"}
    body = {"messages": chat(*texts), "max_tokens": N}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    fits = {"messages": chat("hi"), "max_tokens": N}
    r = httpx.post(served.url + "/v1/chat/completions", json=fits, headers=headers, timeout=60)
    assert r.json()["usage"]["prompt_tokens"] == tiny_engine.prompt_length(msgs("hi"))
    assert tiny_engine.prompt_length(msgs("hi")) == len(tiny_engine.prompt_ids(msgs("hi"), N))
