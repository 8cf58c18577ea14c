"""Batched decoding (chatkit/batching.py) and the server's batching worker: every request decoded in a
batch gets exactly the reply, token counts and finish reason it gets alone (greedy, or sampled with its
own seed), whatever joins or leaves the batch around it; cancelling one leaves the others intact."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import free_port, serve_in_thread

from chatkit.batching import BatchDecoder
from chatkit.chat import ChatEngine, Decoding, GenerationParams, StreamInfo
from chatkit.conversation import Message

WORDS = "apple river stone red fish blue what is two plus three hello how are you fine thanks".split()


def prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of 1 to 30 words: rows of very different widths, so padding goes both ways."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def endless(engine: ChatEngine) -> ChatEngine:
    """The engine without eos nor stop strings: every reply runs to its max tokens (most to compare)."""
    tpl = dataclasses.replace(engine.template, stop_strings=())
    e = ChatEngine(engine.model, engine.tokenizer, tpl, engine.device)
    e.eos_ids = set()
    return e


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> ChatEngine:
    from chatkit.pretrained import prepare_tiny

    out = tmp_path_factory.mktemp("tiny_llama") / "llama"
    prepare_tiny(corpus=[], out=str(out), vocab_size=300, layers=2, hidden=64, heads=4, arch="llama")
    return ChatEngine.from_pretrained(out, device="cpu")


class Collect:
    """A sink: what one row put, pieces and errors, in order."""

    def __init__(self, on_piece=None) -> None:
        self.items: list[str | Exception] = []
        self.on_piece = on_piece

    def put(self, item: str | Exception) -> None:
        self.items.append(item)
        if self.on_piece is not None:
            self.on_piece(self)

    @property
    def text(self) -> str:
        errors = [i for i in self.items if isinstance(i, Exception)]
        assert not errors, errors
        return "".join(self.items)  # type: ignore[arg-type]


def run_batched(jobs: list[Decoding], max_rows: int = 4, sinks: list[Collect] | None = None) -> list[Collect]:
    """Decode `jobs` as the server's worker does, one joining per step (so rows join mid-flight, at
    other widths than the batch's); returns each job's sink. Fails unless rows really shared steps."""
    sinks = sinks or [Collect() for _ in jobs]
    batch, waiting, left, peak = (
        BatchDecoder(jobs[0].engine, max_rows),
        list(zip(jobs, sinks, strict=True)),
        len(jobs),
        0,
    )
    while left:
        if waiting and batch.accepts(waiting[0][0]):
            left -= len(batch.add(*waiting.pop(0)))
        peak = max(peak, len(batch))
        left -= len(batch.step())
    assert peak > 1 and len(batch) == 0 and batch.cache is None
    return sinks


def alone(decoding: Decoding) -> tuple[str, StreamInfo]:
    text = "".join(decoding)
    return text, decoding.info


def U(text: str) -> list[Message]:
    return [Message("user", text)]


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_greedy_replies_in_a_batch_equal_the_replies_alone(arch, tiny_engine, tiny_llama):
    """Sixteen prompts of 1 to 30 words, four rows at a time, each joining between two steps and
    leaving when done: every reply, token count and finish reason is the one decoded alone."""
    engine = endless(tiny_engine if arch == "gpt_neox" else tiny_llama)
    greedy = GenerationParams(max_new_tokens=16, sample=False)
    texts = prompts(16)
    expected = [alone(engine.stream(U(t), greedy)) for t in texts]
    jobs = [engine.stream(U(t), greedy) for t in texts]
    got = run_batched(jobs)
    assert [s.text for s in got] == [text for text, _ in expected]
    assert [j.info for j in jobs] == [info for _, info in expected]
    assert len({text for text, _ in expected}) > 8  # different prompts, different replies: mixing would show


def test_each_request_samples_with_its_own_seed_and_parameters(tiny_engine):
    """A seeded request samples the same reply alone and in a batch beside others (seeded, unseeded,
    greedy), each with its own temperature, top-k and top-p."""
    engine = endless(tiny_engine)
    texts = prompts(6, seed=1)
    params = [GenerationParams(16, True, 1.0, 0, 1.0), GenerationParams(16, True, 0.7, 20, 0.9),
              GenerationParams(16, True, 1.3, 5, 1.0), GenerationParams(16, False),
              GenerationParams(16, True, 1.0, 0, 0.8), GenerationParams(16, True, 0.9, 0, 1.0)]  # fmt: skip
    seeds = [1, 2, 3, None, 5, None]
    expected = [alone(engine.stream(U(t), p, s))[0] for t, p, s in zip(texts, params, seeds, strict=True)]
    got = run_batched([engine.stream(U(t), p, s) for t, p, s in zip(texts, params, seeds, strict=True)])
    for i, seed in enumerate(seeds):
        if seed is not None or not params[i].sample:
            assert got[i].text == expected[i], i


def test_a_cancelled_request_leaves_the_others_intact(tiny_engine):
    engine = endless(tiny_engine)
    greedy = GenerationParams(max_new_tokens=24, sample=False)
    texts = prompts(4, seed=2)
    expected = [alone(engine.stream(U(t), greedy))[0] for t in texts]
    cancel = threading.Event()
    jobs = [engine.stream(U(t), greedy, cancel=cancel if i == 1 else None) for i, t in enumerate(texts)]
    sinks = [Collect(on_piece=(lambda s: len(s.items) >= 3 and cancel.set()) if i == 1 else None)
             for i in range(4)]  # fmt: skip
    got = run_batched(jobs, sinks=sinks)
    assert jobs[1].info.finish_reason == "cancelled" and jobs[1].info.completion_tokens < 24
    assert expected[1].startswith(got[1].text) and got[1].text != expected[1]
    assert [got[i].text for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]


def test_stop_strings_eos_and_max_tokens_are_each_requests_own(tiny_engine):
    """Rows end at different steps, by their own stop strings, max tokens or eos (the engine's own:
    the template's stops and eos are on here), and report it as they would alone."""
    greedy = GenerationParams(max_new_tokens=20, sample=False)
    texts = prompts(8, seed=3)
    full = [alone(endless(tiny_engine).stream(U(t), greedy))[0] for t in texts]
    stops = [[full[i][4:6]] if i % 2 and len(full[i]) > 6 else [] for i in range(8)]
    params = [dataclasses.replace(greedy, max_new_tokens=3 + 2 * i) for i in range(8)]
    for engine in (tiny_engine, endless(tiny_engine)):
        expected = [
            alone(engine.stream(U(t), p, stop=s)) for t, p, s in zip(texts, params, stops, strict=True)
        ]
        jobs = [engine.stream(U(t), p, stop=s) for t, p, s in zip(texts, params, stops, strict=True)]
        got = run_batched(jobs)
        assert [g.text for g in got] == [text for text, _ in expected]
        assert [j.info for j in jobs] == [info for _, info in expected]
    assert {info.finish_reason for _, info in expected} == {"stop", "length"}


def test_raw_completions_batch_too(tiny_engine):
    engine = endless(tiny_engine)
    greedy = GenerationParams(max_new_tokens=12, sample=False)
    texts = prompts(5, seed=4)
    expected = [alone(engine.complete(t, greedy))[0] for t in texts]
    assert [s.text for s in run_batched([engine.complete(t, greedy) for t in texts])] == expected


# --- the server: a real uvicorn in a thread, concurrent clients ------------------------------------


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip


@pytest.fixture
def batched_server(tiny_engine, monkeypatch):
    """A function serving an engine on 127.0.0.1 (max 4 requests per batch); yields its URL. Records
    the largest batch stepped, in .peak, to show requests really decoded together."""
    from chatkit.serve import ServerConfig, create_app

    peak = [0]
    step = BatchDecoder.step

    def recording(self):
        peak[0] = max(peak[0], len(self))
        return step(self)

    monkeypatch.setattr(BatchDecoder, "step", recording)
    servers = []

    def serve(engine, **config) -> str:
        port = free_port()
        params = GenerationParams(max_new_tokens=16, sample=False)
        app = create_app(engine, ServerConfig("tiny", params, **{"max_batch": 4} | config))
        servers.append(serve_in_thread(app, port))
        return f"http://127.0.0.1:{port}"

    serve.peak = peak
    yield serve
    for s in servers:
        s.should_exit = True


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=120)


def streamed(url: str, body: dict) -> str:
    """The text of a streamed answer (chat deltas or completion text)."""
    out = []
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                out.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
    return "".join(out)


def test_concurrent_clients_get_the_answers_they_get_alone(batched_server, tiny_engine):
    """Eight clients at once (chat and completions, streamed and not, greedy and seeded): each answer
    equals the engine's alone, and the server decoded several of them in one step."""
    engine = endless(tiny_engine)
    url = batched_server(engine)
    texts = prompts(8, seed=5)
    greedy = GenerationParams(max_new_tokens=16, sample=False)
    seeded = GenerationParams(max_new_tokens=16, sample=True, temperature=1.0, top_k=0)

    def expected(i: int) -> str:
        p = seeded if i % 4 == 3 else greedy
        seed = i if i % 4 == 3 else None
        return "".join(
            engine.complete(texts[i], p, seed) if i % 4 == 2 else engine.stream(U(texts[i]), p, seed)
        )

    def ask(i: int) -> str:
        body = {"max_tokens": 16, "temperature": 1.0 if i % 4 == 3 else 0, "top_k": 0, "seed": i}
        if i % 4 == 2:
            return streamed(f"{url}/v1/completions", body | {"prompt": texts[i]})
        body["messages"] = [{"role": "user", "content": texts[i]}]
        if i % 2:
            return streamed(f"{url}/v1/chat/completions", body)
        return post(f"{url}/v1/chat/completions", body).json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == [expected(i) for i in range(8)]
    assert batched_server.peak[0] > 1
    assert httpx.get(url + "/health").json()["waiting"] == 0


def test_a_client_that_hangs_up_is_cancelled_and_the_others_finish(batched_server, tiny_engine):
    engine = endless(tiny_engine)
    url = batched_server(engine)
    texts = prompts(3, seed=6)
    greedy = GenerationParams(max_new_tokens=200, sample=False)
    expected = ["".join(engine.stream(U(t), greedy)) for t in texts[1:]]
    info = {}

    def hang_up() -> None:
        body = {"messages": [{"role": "user", "content": texts[0]}], "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break  # closing the stream cancels the job
        info["left"] = True

    def ask(t: str) -> str:
        body = {"messages": [{"role": "user", "content": t}], "max_tokens": 200, "temperature": 0}
        return post(f"{url}/v1/chat/completions", body).json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(3) as pool:
        leaving = pool.submit(hang_up)
        answers = [pool.submit(ask, t) for t in texts[1:]]
        assert [a.result() for a in answers] == expected
        leaving.result()
    assert info["left"] and httpx.get(url + "/health").json()["waiting"] == 0


def test_tool_requests_batch_and_answer_as_one_at_a_time(batched_server, tiny_engine):
    """Requests with `tools` (a template with a tool format) decode in the batch; every answer (its
    message and finish reason) equals the one a server decoding one request at a time gives."""
    from chatkit.templates import get_template

    engine = ChatEngine(tiny_engine.model, tiny_engine.tokenizer, get_template("mistral"), tiny_engine.device)
    batched, serial = batched_server(engine), batched_server(engine, max_batch=1)
    bodies = [{"messages": [{"role": "user", "content": t}], "tools": [WEATHER], "max_tokens": 12,
               "temperature": 0} for t in prompts(6, seed=7)]  # fmt: skip

    def answer(url: str, body: dict) -> tuple:
        r = post(f"{url}/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"], choice["finish_reason"], r.json()["usage"]

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda b: answer(batched, b), bodies))
    assert batched_server.peak[0] > 1
    assert got == [answer(serial, b) for b in bodies]


# --- the worker: queue limit, batch size, what cannot batch ----------------------------------------


def test_the_queue_limit_counts_running_and_waiting_requests():
    """`max_queue` requests waiting or running: the next is refused with 503; a generation that is
    not a `Decoding` (here a plain generator) runs alone, and the worker goes on after it."""
    from chatkit.serve.protocol import ApiError
    from chatkit.serve.worker import Worker

    go = threading.Event()

    def gated(**_):
        go.wait(20)
        yield "done"

    async def scenario() -> list[str]:
        worker = Worker(max_queue=2, max_batch=4)
        jobs = [worker.start(gated), worker.start(gated)]
        with pytest.raises(ApiError) as refused:
            worker.start(gated)
        assert refused.value.status == 503 and worker.pending == 2
        go.set()
        out = [[i async for i in job.items()] for job in jobs]
        worker.close()
        return [x for o in out for x in o]

    assert asyncio.run(scenario()) == ["done", "done"]


def test_max_batch_is_the_operators_and_must_be_positive(tiny_engine):
    from chatkit.serve import ServerConfig, create_app
    from chatkit.serve.cli import _parser

    args = _parser().parse_args(["--model", "m", "--max-batch", "3"])
    assert args.max_batch == 3 and _parser().parse_args(["--model", "m"]).max_batch == 8
    app = create_app(tiny_engine, ServerConfig("t", GenerationParams(), max_batch=3))
    assert app.state.chatkit.worker.max_batch == 3
    with pytest.raises(ValueError, match="at least 1"):
        ServerConfig("t", GenerationParams(), max_batch=0)
    assert Path(__file__).parents[1].joinpath("README.md").read_text().count("--max-batch") >= 1
