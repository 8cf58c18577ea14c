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
    # Each of these was a 500 (the first two in plain text): a RecursionError in the JSON parser, a
    # seed torch cannot take ("Overflow when unpacking long long"), half a surrogate pair in the text.
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"a": '
        + b"[" * 5000
        + b"]" * 5000
        + b"}}",
        "nested too deeply",
    ),  # fmt: skip
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}', "seed"),  # 2**70
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', "seed"),  # 2**64
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -9223372036854775809}', "seed"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', "stop"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', "not valid Unicode"),
    # Not JSON as RFC 8259 says, whatever Python's parser allows.
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "Infinity"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid JSON"),  # not UTF-8
    (b"", "not valid JSON"),
    (b"null", "JSON object"),
    (b'"hi"', "JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e30}', "max_tokens"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1267650600228229401496703205376}',
        "max_tokens",
    ),  # fmt: skip
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -1}', "top_k"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}', "content"),
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
    with TestClient(app, base_url="http://127.0.0.1") as c:  # a Host this server answers to
        for method, path in api:
            auths = (
                None,
                b"Bearer wrong",
                b"Basic k",
                "Bearer \xe9t\xe9".encode("latin-1"),
                b"Bearer ",
                b"Bearer",
            )
            for auth in auths:
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


# --- hardening: body size, work off the event loop, Host and Origin, the key, no 5xx -------------


def auth(served, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {served.key}", "Content-Type": "application/json", **more}


def raw_exchange(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send `request` as is on a fresh connection; what the server answers, read until it closes or
    `timeout` passes without a byte (a server still waiting for the rest of a body answers nothing)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(request)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and b'"error"' in got:
                    break
        except TimeoutError:
            pass
    return got


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    limit = 1 << 20  # the default --max-body
    url = served.url + "/v1/chat/completions"
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * limit + b'"}]}'
    r = httpx.post(url, content=big, headers=auth(served), timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and str(limit) in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while the stream is read
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}]}'

    r = httpx.post(url, content=chunks(), headers=auth(served), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A client that announces 10 MB is answered at once, from the header: the server never waits for
    # (nor holds) the body. Before the limit it waited here for bytes that never came.
    port = served.url.rsplit(":", 1)[1]
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer "
            f"{served.key}\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{{")  # fmt: skip
    answer = raw_exchange(served.url, head.encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer
    # Under the limit, a long prompt is read, parsed and measured: too long for the context, a 400.
    r = httpx.post(url, content=big[: limit - 100] + b'"}]}', headers=auth(served), timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(served.url + "/health").json()["waiting"] == 0


def test_max_body_is_the_operators(tiny_engine: ChatEngine):
    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app
    from chatkit.serve.cli import _parser

    assert _parser().parse_args(["--model", "m"]).max_body == 1 << 20
    assert _parser().parse_args(["--model", "m", "--max-body", "512k"]).max_body == 512 << 10
    assert _parser().parse_args(["--model", "m", "--max-body", "2m"]).max_body == 2 << 20
    body = json.dumps({"messages": chat("hi"), "max_tokens": 1}).encode()
    app = create_app(tiny_engine, ServerConfig("tiny", GREEDY, max_body=len(body)))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        headers = {"Content-Type": "application/json"}
        assert c.post("/v1/chat/completions", content=body, headers=headers).status_code == 200
        r = c.post("/v1/chat/completions", content=body + b" ", headers=headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


class GatedEngine:
    """The tiny engine, except that measuring a prompt (tokenizing it) waits, up to 20 s, until the
    test has had its answer from /health: a server measuring on its event loop cannot give one."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine
        self.measuring, self.go_on = threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def _wait(self) -> None:
        self.measuring.set()
        self.go_on.wait(20)

    def prompt_length(self, messages, **kwargs) -> int:
        self._wait()
        return self.engine.prompt_length(messages, **kwargs)

    def text_length(self, text: str) -> int:
        self._wait()
        return self.engine.text_length(text)


def serve_in_thread(app, port: int):
    """Run `app` on uvicorn in a thread on 127.0.0.1:`port`; returns the server (set should_exit)."""
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_answers_while_a_prompt_is_being_measured(tiny_engine: ChatEngine):
    """Tokenizing a long prompt takes seconds; it runs off the event loop, so the server goes on
    answering (a 10 MB prompt froze /health for a minute when it ran on the loop)."""
    from chatkit.serve import ServerConfig, create_app

    gated = GatedEngine(tiny_engine)
    port = free_port()
    server = serve_in_thread(create_app(gated, ServerConfig("tiny", GREEDY)), port)
    url = f"http://127.0.0.1:{port}"
    try:
        for path, body in [("/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 1}),
                           ("/v1/completions", {"prompt": "hi there", "max_tokens": 1})]:  # fmt: skip
            gated.measuring.clear()
            gated.go_on.clear()
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(httpx.post, url + path, json=body, timeout=60)
                assert gated.measuring.wait(30), path
                try:
                    health = httpx.get(url + "/health", timeout=10)
                finally:
                    gated.go_on.set()
                assert health.status_code == 200 and health.json()["status"] == "ok"
                assert answer.result().status_code == 200, answer.result().text
    finally:
        gated.go_on.set()
        server.should_exit = True


def test_the_host_header_must_name_this_server(served):
    port = served.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        r = httpx.get(served.url + "/health", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    # A DNS-rebinding page's requests name its own host: refused, on every route, key or not.
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", f"127.0.0.2:{port}", "localhost"):
        for method, path in [("GET", "/health"), ("GET", "/"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions")]:  # fmt: skip
            r = httpx.request(method, served.url + path, headers=auth(served, Host=host),
                              json={"messages": chat("hi"), "max_tokens": 1})  # fmt: skip
            assert r.status_code == 421, (host, path, r.text)
            assert r.json()["error"]["code"] == "misdirected_request"
    answer = raw_exchange(served.url, b"GET /health HTTP/1.0\r\n\r\n")  # no Host at all
    assert answer.startswith(b"HTTP/1.1 400") and b'"invalid_host"' in answer


def test_allowed_hosts_and_binding_every_address(tiny_engine: ChatEngine):
    import subprocess
    import sys
    from pathlib import Path

    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app

    config = ServerConfig(
        "tiny", GREEDY, host="0.0.0.0", port=8000, allowed_hosts=("chat.lan", "10.0.0.5:8000")
    )
    app = create_app(tiny_engine, config)
    for base, status in [("http://chat.lan", 200), ("http://chat.lan:9", 200), ("http://10.0.0.5:8000", 200),
                         ("http://10.0.0.5:8001", 421), ("http://localhost:8000", 200),
                         ("http://0.0.0.0:8000", 421), ("http://other.lan:8000", 421)]:  # fmt: skip
        with TestClient(app, base_url=base) as c:
            assert c.get("/health").status_code == status, base
    # '*' accepts any Host, but a cross-site page is still refused.
    with TestClient(create_app(tiny_engine, ServerConfig("t", GREEDY, allowed_hosts=("*",))),
                    base_url="http://anything.example") as c:  # fmt: skip
        assert c.get("/health").status_code == 200
        r = c.post("/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
    for bad in [
        dict(host="0.0.0.0"),
        dict(host="::"),
        dict(allowed_hosts=("a b",)),
        dict(allowed_hosts=("x:0",)),
    ]:
        with pytest.raises(ValueError):
            ServerConfig("t", GREEDY, **bad)
    # The command line says so in one line, before loading any model (this one does not exist).
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "inference/serve.py", "--model", "/nonexistent", "--host", "0.0.0.0"]
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--allowed-host" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_cross_site_posts_are_refused(served):
    url = served.url + "/v1/chat/completions"
    body = {"messages": chat("hi"), "max_tokens": 1}
    port = served.url.rsplit(":", 1)[1]
    # A page elsewhere (key or not): 403, before anything is read or run.
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", "http://127.0.0.1:1",
                   "file://", f"https://127.0.0.1.evil.example:{port}"):  # fmt: skip
        r = httpx.post(url, json=body, headers=auth(served, Origin=origin))
        assert r.status_code == 403, (origin, r.text)
        assert r.json()["error"]["code"] == "cross_site_request"
    # The page's own origin (the web chat), and GETs from anywhere (nothing runs; the answer stays
    # unreadable there without CORS headers), go through.
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        r = httpx.post(url, json=body, headers=auth(served, Origin=origin), timeout=60)
        assert r.status_code == 200, (origin, r.text)
    assert (
        httpx.get(served.url + "/v1/models", headers=auth(served, Origin="http://evil.example")).status_code
        == 200
    )
    # What an old browser's form could send without an Origin: not JSON by its type, so 415.
    text = json.dumps(body)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Authorization": f"Bearer {served.key}"} | ({"Content-Type": ctype} if ctype else {})
        r = httpx.post(url, content=text, headers=headers)
        assert r.status_code == 415, (ctype, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url, content=text, headers=auth(served, **{"Content-Type": "Application/JSON; charset=utf-8"}),
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text


def test_an_empty_api_key_is_a_configuration_error_and_never_matches(tiny_engine: ChatEngine):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app

    for key in ("", "  "):
        with pytest.raises(ValueError, match="empty"):
            ServerConfig("t", GREEDY, api_key=key)
    repo = Path(__file__).resolve().parents[1]
    base = [sys.executable, "inference/serve.py", "--model", "/nonexistent"]
    for extra, env in [(["--api-key", ""], {}), ([], {"CHATKIT_API_KEY": ""})]:
        p = subprocess.run(base + extra, cwd=repo, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, **env))  # fmt: skip
        assert p.returncode == 2 and "API key is empty" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    # Should a key become empty anyway, an empty bearer still does not match it.
    app = create_app(tiny_engine, ServerConfig("t", GREEDY, api_key="k"))
    app.state.chatkit.config.api_key = ""
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for header in ("Bearer ", "Bearer", "bearer  "):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 401


def test_no_openapi_schema_and_errors_keep_the_api_shape(served):
    for method, path in [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere"),
                         ("GET", "/v1/chat/completions"), ("POST", "/health")]:  # fmt: skip
        r = httpx.request(method, served.url + path, headers=auth(served))
        assert r.status_code in (404, 405), (path, r.status_code)
        assert r.json()["error"]["type"] == "invalid_request_error", r.text


ODD = [None, True, False, 0, -1, 2**70, -(2**70), 1.5, -0.0, 1e308, "", "x", "\u00e9", [], [None], ["x"],
       [1], {}, {"x": 1}, {"include_usage": "yes"}, [[[]]]]  # fmt: skip
SHARED_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
                 "stream_options", "max_completion_tokens"]  # fmt: skip


def test_wrong_values_in_every_field_get_4xx_never_5xx(tiny_engine: ChatEngine):
    """Every field, every JSON type and some edge values, on both routes: a 4xx or an answer."""
    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app

    chat_base = {"messages": chat("hi"), "max_tokens": 1}
    cases = []
    for value in ODD:
        for name in [*SHARED_FIELDS, "messages"]:
            cases.append(("/v1/chat/completions", chat_base | {name: value}))
        for name in [*SHARED_FIELDS, "prompt", "echo"]:
            cases.append(("/v1/completions", {"prompt": "hi", "max_tokens": 1} | {name: value}))
        for message in ({"role": value, "content": "hi"}, {"role": "user", "content": value},
                        {"role": "user", "content": [{"type": value, "text": "hi"}]},
                        {"role": "user", "content": [{"type": "text", "text": value}]}, value):  # fmt: skip
            cases.append(("/v1/chat/completions", chat_base | {"messages": [message]}))
    app = create_app(tiny_engine, ServerConfig("tiny", GREEDY))
    failures = []
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        for path, body in cases:
            r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            if r.status_code >= 500 or (r.status_code >= 400 and "error" not in r.json()):
                failures.append((path, body, r.status_code, r.text[:200]))
    assert not failures, failures[:5]


def test_a_flood_of_hostile_requests_gets_no_5xx_and_health_keeps_answering(served, client):
    """The operator's attack, bounded (8 requests in flight) against the real server: malformed and
    wrong bodies, bodies over the limit (declared and chunked), prompts just under it, foreign Host
    headers, cross-site and text/plain posts, no key; /health is asked all along."""
    import time

    port = served.url.rsplit(":", 1)[1]
    url = served.url + "/v1/chat/completions"
    limit = 1 << 20
    near = b'{"messages": [{"role": "user", "content": "' + b"word " * ((limit - 100) // 5) + b'"}]}'
    over = near[:-4] + b"x" * (limit - len(near) + 10) + b'"}]}'

    def chunked():
        yield over[: len(over) // 2]
        yield over[len(over) // 2 :]

    json_type = {"Content-Type": "application/json"}
    requests: list[tuple[str, dict]] = []  # (kind, httpx.request arguments)
    for body, _ in BAD:
        requests.append(("bad body", dict(content=body, headers=auth(served))))
    for value in ODD[:12]:
        for name in ("max_tokens", "temperature", "seed", "stop", "messages"):
            body = json.dumps(
                {"messages": chat("hi"), name: value} | ({"max_tokens": 1} if name != "max_tokens" else {})
            )
            requests.append(("odd value", dict(content=body, headers=auth(served))))
    for _ in range(8):
        requests.append(("over the limit", dict(content=over, headers=auth(served))))
        requests.append(("over the limit, chunked", dict(content=chunked(), headers=auth(served))))
        requests.append(("just under the limit", dict(content=near, headers=auth(served))))
    small = json.dumps({"messages": chat("hi"), "max_tokens": 1})
    for i in range(16):
        requests.append(
            ("foreign Host", dict(content=small, headers=auth(served, Host=f"evil{i}.example:{port}")))
        )
        requests.append(
            ("cross-site", dict(content=small, headers=auth(served, Origin=f"http://evil{i}.example")))
        )
        requests.append(
            ("text/plain", dict(content=small, headers=auth(served, **{"Content-Type": "text/plain"})))
        )
        requests.append(("no key", dict(content=small, headers=json_type)))
    for _ in range(4):
        requests.append(("good", dict(content=small, headers=auth(served))))
    # Deterministic order, mixed: neighbours differ, and the slow ones are spread out.
    requests = requests[::3] + requests[1::3] + requests[2::3]

    health: list[float] = []
    health_errors: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            t = time.monotonic()
            try:
                ok = httpx.get(served.url + "/health", timeout=15).status_code == 200
                if not ok:
                    health_errors.append("status")
            except httpx.HTTPError as e:
                health_errors.append(repr(e))
            health.append(time.monotonic() - t)
            done.wait(0.2)

    def send(item: tuple[str, dict]) -> tuple[str, int | str]:
        kind, kwargs = item
        try:
            return kind, httpx.request("POST", url, timeout=120, **kwargs).status_code
        except httpx.TransportError as e:  # a connection the server closed on an oversized upload
            return kind, type(e).__name__

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, requests))
    finally:
        done.set()
        watcher.join(30)

    by_kind: dict[str, dict] = {}
    for kind, status in results:
        by_kind.setdefault(kind, {}).setdefault(status, 0)
        by_kind[kind][status] += 1
    print(f"\n{len(results)} requests: {by_kind}")
    print(f"/health: {len(health)} answers, max {max(health):.2f} s")
    assert not [s for _, s in results if isinstance(s, int) and s >= 500], by_kind
    # Only an upload cut off after its 413 may end without a status.
    assert all(isinstance(s, int) for k, s in results if not k.startswith("over")), by_kind
    assert set(by_kind["foreign Host"]) == {421} and set(by_kind["cross-site"]) == {403}
    assert set(by_kind["text/plain"]) == {415} and set(by_kind["no key"]) == {401}
    assert set(by_kind["just under the limit"]) == {400} and set(by_kind["good"]) == {200}
    assert {s for k, s in results if k.startswith("over") and isinstance(s, int)} <= {413}
    assert not health_errors and len(health) >= 3, health_errors
    assert max(health) < 15  # generous: it answered throughout, not after the flood
    # And it still serves, correctly.
    r = client.chat.completions.create(model="tiny", messages=chat("hi"), max_tokens=2, temperature=0)
    assert r.choices and httpx.get(served.url + "/health").json()["waiting"] == 0


# --- the model's name, and one set of defaults -----------------------------------------------------


def test_a_request_for_another_model_gets_404_model_not_found(tiny_engine: ChatEngine):
    """OpenAI's answer to an unknown model, on both routes; the served name and an omitted model work."""
    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app

    app = create_app(tiny_engine, ServerConfig("demo", GREEDY))
    routes = [("/v1/chat/completions", {"messages": chat("hi")}), ("/v1/completions", {"prompt": "hi"})]
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for path, body in routes:
            for model in ("hf", "gpt-4o", ""):
                r = c.post(path, json=body | {"model": model, "max_tokens": 1})
                assert r.status_code == 404, (path, model, r.text)
                assert r.json()["error"] | {"message": ""} == {
                    "message": "", "type": "invalid_request_error", "param": "model", "code": "model_not_found",
                }  # fmt: skip
                assert "'demo'" in r.json()["error"]["message"]
            for named in ({"model": "demo"}, {}):
                r = c.post(path, json=body | named | {"max_tokens": 1})
                assert r.status_code == 200 and r.json()["model"] == "demo", r.text


def test_an_export_folder_is_served_by_the_name_of_its_run(tmp_path):
    from chatkit.serve.cli import served_name

    assert served_name("outputs/demo/hf") == "demo"
    assert served_name(tmp_path / "outputs" / "koala" / "hf") == "koala"
    assert served_name("pretrained/tiny/model") == "tiny"
    assert served_name(tmp_path / "my-chat-model") == "my-chat-model"


class RecordingEngine:
    """The tiny engine, keeping the parameters of every generation it starts."""

    def __init__(self, engine: ChatEngine):
        self.engine, self.params = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def stream(self, messages, params, *args, **kwargs):
        self.params.append(params)
        return self.engine.stream(messages, params, *args, **kwargs)

    def complete(self, prompt, params, *args, **kwargs):
        self.params.append(params)
        return self.engine.complete(prompt, params, *args, **kwargs)


def test_bot_server_and_page_share_one_set_of_generation_defaults(tiny_engine: ChatEngine):
    """GenerationParams' defaults are the bot's flags, the server's flags, what both API routes use
    when a request leaves a field out, and what /health tells the page (which sends only set fields)."""
    from fastapi.testclient import TestClient

    from chatkit.bot import build_parser, params_from_args
    from chatkit.serve import ServerConfig, create_app
    from chatkit.serve.cli import _parser

    d = GenerationParams()
    for parser in (build_parser(), _parser()):
        assert params_from_args(parser.parse_args(["--model", "m"])) == d
    engine = RecordingEngine(tiny_engine)
    app = create_app(engine, ServerConfig("tiny", d))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/health").json()["defaults"] == {
            "max_tokens": d.max_new_tokens, "temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
        }  # fmt: skip
        assert c.post("/v1/chat/completions", json={"messages": chat("hi"), "seed": 0}).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hi", "seed": 0}).status_code == 200
    assert engine.params == [d, d]
    temperature_field = app.state.chatkit.page.split('id="temperature"')[1].split(">")[0]
    assert "value=" not in temperature_field  # nothing of its own: the server's default applies


def test_the_readme_serving_examples_answer_as_printed():
    """The README's curl bodies and its `openai` snippet's request, on the demo model served under
    the name its folder gives it, answer what the README says they do."""
    import re
    from pathlib import Path

    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app
    from chatkit.serve.cli import served_name

    repo = Path(__file__).resolve().parents[1]
    demo = repo / "outputs" / "demo" / "hf"
    if not (demo / "config.json").is_file():
        pytest.skip(f"{demo} not found: `make demo` makes it")
    text = (repo / "README.md").read_text()
    serving = text[text.index("### Serving: a web chat") : text.index("\n## Retrieval")]
    chat_body, completion_body = (json.loads(b) for b in re.findall(r"-d '(\{.*\})'", serving))
    snippet = re.search(r"model=\"(\w+)\", stream=True, messages=(\[.*\])\n", serving)
    engine = ChatEngine.from_pretrained(demo, device="cpu")
    app = create_app(engine, ServerConfig(served_name("outputs/demo/hf"), GenerationParams()))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/v1/chat/completions", json=chat_body)
        assert r.json()["choices"][0]["message"]["content"] == "42" and '`"content": "42"`' in serving
        events = c.post("/v1/completions", json=completion_body).text.split("\n\n")
        chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        assert "".join(x["choices"][0]["text"] for x in chunks) == " 42" and events[-2] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        for seed in range(5):  # the snippet samples (the defaults): the demo model is sure of its answer
            body = {"model": snippet[1], "messages": json.loads(snippet[2]), "seed": seed}
            r = c.post("/v1/chat/completions", json=body)
            assert r.json()["choices"][0]["message"]["content"] == "paper music tiger", r.text
    assert "(this prints `paper music tiger`)" in serving


# --- tools, tool results and reasoning, in OpenAI's shapes ----------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


class CallRecorder(RecordingEngine):
    """The tiny engine under another template, keeping what every chat generation was given."""

    def __init__(self, engine: ChatEngine, template: str):
        from chatkit.templates import get_template

        super().__init__(ChatEngine(engine.model, engine.tokenizer, get_template(template), engine.device))
        self.calls: list[tuple[list[Message], dict]] = []

    def stream(self, messages, params, *args, **kwargs):
        self.calls.append((list(messages), kwargs))
        return super().stream(messages, params, *args, **kwargs)


def tool_app(engine):
    from fastapi.testclient import TestClient

    from chatkit.serve import ServerConfig, create_app

    return TestClient(create_app(engine, ServerConfig("tiny", GREEDY)), base_url="http://127.0.0.1")


def test_tools_for_a_template_without_a_tool_format_are_refused_naming_it(tiny_engine: ChatEngine):
    with tool_app(tiny_engine) as c:
        r = c.post("/v1/chat/completions", json={"messages": chat("hi"), "tools": [WEATHER], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert (
            "chat template 'openchatkit' has no format for tool definitions" in r.json()["error"]["message"]
        )
        # tool_choice none: the tools stay out of the prompt, so any template answers
        body = {"messages": chat("hi"), "tools": [WEATHER], "tool_choice": "none", "max_tokens": 1}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        tool_turn = [*chat("hi"), {"role": "tool", "tool_call_id": "call12345", "content": "22"}]
        r = c.post("/v1/chat/completions", json={"messages": tool_turn, "max_tokens": 1})
        assert r.status_code == 400 and "'openchatkit' has no format for a tool result" in r.text


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
    ({"tools": [{"function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "two functions are named 'get_weather'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice: must be 'none', 'auto', 'required'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice: no function named 'get_time'"),
    ({"tools": [WEATHER], "tool_choice": {"function": "get_weather"}}, "tool_choice: a named choice is"),
    ({"tool_choice": "required"}, "'required' needs tools"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs.add_vision_id"),
]  # fmt: skip


def called(call_id: str, arguments: str) -> dict:
    """An assistant message of one get_weather call, as OpenAI's clients send it back."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


BAD_TOOL_MESSAGES = [
    ([{"role": "user", "content": "hi", "tool_call_id": "x"}], "tool_call_id: not allowed in a user message"),
    ([{"role": "user", "content": None}], "content: required"),
    ([*chat("hi"), called("call12345", "{oops"), {"role": "tool", "content": "1"}],
     "messages[1].tool_calls[0].function.arguments: not JSON"),
    ([*chat("hi"), called("c1", "{}"), {"role": "tool", "tool_call_id": "c1", "content": "1"}],
     "Tool call IDs should be alphanumeric strings with length 9"),
    ([*chat("hi", "hello")], "the last message must be the user's (or a tool result)"),
]  # fmt: skip


def test_malformed_tools_tool_choices_and_tool_messages_get_400(tiny_engine: ChatEngine):
    with tool_app(CallRecorder(tiny_engine, "mistral")) as c:
        for extra, says in BAD_TOOLS:
            r = c.post("/v1/chat/completions", json={"messages": chat("hi"), "max_tokens": 1} | extra)
            assert r.status_code == 400 and says in r.json()["error"]["message"], (extra, r.text)
        for messages, says in BAD_TOOL_MESSAGES:
            r = c.post(
                "/v1/chat/completions", json={"messages": messages, "tools": [WEATHER], "max_tokens": 1}
            )
            assert r.status_code == 400 and says in r.json()["error"]["message"], (messages, r.text)


def test_tool_calls_results_and_choices_reach_the_template_as_chatkit_messages(tiny_engine: ChatEngine):
    """OpenAI's shapes in, the engine given chatkit's messages and the tools the choice shows; reasoning
    sent back by a client is dropped for a template without a place for it (Mistral)."""
    from chatkit.conversation import ToolCall

    engine = CallRecorder(tiny_engine, "mistral")
    result = {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "-3"}
    reply = called("call12345", '{"city": "Oslo"}') | {"reasoning_content": "Look it up."}
    messages = [*chat("Weather in Oslo?"), reply, result]
    expected = [
        Message("user", "Weather in Oslo?"),
        Message("assistant", "", tool_calls=(ToolCall("get_weather", {"city": "Oslo"}, "call12345"),)),
        Message("tool", "-3", tool_call_id="call12345", name="get_weather"),
    ]
    with tool_app(engine) as c:
        for choice, shown in (("auto", [WEATHER, TIME]), ("required", [WEATHER, TIME]), ("none", None),
                              ({"type": "function", "function": {"name": "get_time"}}, [TIME])):  # fmt: skip
            body = {"messages": messages, "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 2}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            given, kwargs = engine.calls[-1]
            assert given == expected and kwargs["tools"] == shown and kwargs["thinking"] is None
            assert r.json()["usage"]["prompt_tokens"] == engine.prompt_length(expected, tools=shown)
            assert r.json()["choices"][0]["finish_reason"] in (
                "stop",
                "length",
            )  # a random model calls nothing


def test_thinking_and_past_reasoning_reach_a_reasoning_template(tiny_engine: ChatEngine):
    engine = CallRecorder(tiny_engine, "qwen3")
    history = [
        *chat("2+2?"),
        {"role": "assistant", "content": "4", "reasoning_content": "Add."},
        *chat("3+3?"),
    ]
    with tool_app(engine) as c:
        for kwargs, thinking in (({}, None), ({"chat_template_kwargs": {"enable_thinking": False}}, False)):
            r = c.post("/v1/chat/completions", json={"messages": history, "max_tokens": 1} | kwargs)
            assert r.status_code == 200, r.text
            given, recorded = engine.calls[-1]
            assert (
                given[1] == Message("assistant", "4", reasoning="Add.") and recorded["thinking"] is thinking
            )
            assert r.json()["usage"]["prompt_tokens"] == engine.prompt_length(given, thinking=thinking)
    assert engine.prompt_length(given, thinking=False) > engine.prompt_length(given)  # the empty think block


TOOL_FIELDS = ["tools", "tool_choice", "chat_template_kwargs"]


def test_wrong_values_in_the_tool_fields_get_4xx_never_5xx(tiny_engine: ChatEngine):
    """As test_wrong_values_in_every_field_get_4xx_never_5xx, for the fields tool use added."""
    base = {"messages": chat("hi"), "max_tokens": 1}
    cases = []
    for value in [*ODD, [WEATHER, None]]:
        cases += [base | {name: value} for name in TOOL_FIELDS]
        cases.append(base | {"tools": [{"type": "function", "function": {"name": value}}]})
        cases.append(base | {"tools": [{"type": "function", "function": {"name": "f", "parameters": value}}]})
        for message in ({"role": "tool", "content": "x", "tool_call_id": value},
                        {"role": "assistant", "content": "x", "reasoning_content": value},
                        {"role": "assistant", "content": None, "tool_calls": value},
                        {"role": "assistant", "content": None, "tool_calls": [{"function": value}]},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"function": {"name": "get_weather", "arguments": value}}]}):  # fmt: skip
            cases.append(base | {"messages": [*chat("hi"), message, *chat("ok")], "tools": [WEATHER]})
    failures = []
    for template in ("openchatkit", "mistral", "llama3"):
        engine = CallRecorder(tiny_engine, template) if template != "openchatkit" else tiny_engine
        with tool_app(engine) as c:
            for body in cases:
                r = c.post(
                    "/v1/chat/completions",
                    content=json.dumps(body),
                    headers={"Content-Type": "application/json"},
                )
                if r.status_code >= 500 or (r.status_code >= 400 and "error" not in r.json()):
                    failures.append((template, body, r.status_code, r.text[:200]))
    assert not failures, failures[:5]
