"""A tool-call data set trains, end to end, as a user runs it: OpenAI-layout chats with tool calls,
reasoning and tool results -> data/toolcall/prepare.py -> a tiny Qwen3 base (pretrained/tiny/prepare.py)
-> `python -m chatkit.launch` (chatkit's trainer, ZeRO-3 on 2 CPU ranks, template qwen3) ->
tools/convert_to_hf.py -> inference/serve.py -> the official `openai` client: it offers `tools`, gets
the call the data teaches (whole and streamed, finish_reason "tool_calls"), sends the tool's result
back and gets the answer the data teaches. Nothing is mocked; about 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import serve_subprocess
from test_toolcalls import WEATHER  # the tool the data offers, as the fast tests define it

openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Rome")
SKIES = ("sunny", "rainy", "cloudy")
THOUGHT = "I should call get_weather."
GREETINGS = (("hi", "hello"), ("thanks", "you are welcome"), ("bye", "goodbye"))
STEPS = 300  # the call's city is copied from the question from about step 200 on (lr 5e-3, 8 rows a step)


def _rows(n: int, rng: random.Random) -> list[dict]:
    """Chats in OpenAI's layout, `get_weather` offered in each: a weather question (3 in 4) is answered
    by a call naming the asked city after a fixed thought, then by a sentence from the tool's result;
    a greeting by a greeting."""
    rows = []
    for i in range(n):
        if rng.random() < 0.75:
            city, sky, call_id = rng.choice(CITIES), rng.choice(SKIES), f"call_{i}"
            call = {"name": "get_weather", "arguments": json.dumps({"city": city})}
            messages = [
                {"role": "user", "content": f"What is the weather in {city}?"},
                {"role": "assistant", "content": None, "reasoning_content": THOUGHT,
                 "tool_calls": [{"id": call_id, "type": "function", "function": call}]},
                {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"sky": sky})},
                {"role": "assistant", "content": f"It is {sky} in {city}."},
            ]  # fmt: skip
        else:
            said, answer = rng.choice(GREETINGS)
            messages = [{"role": "user", "content": said}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "tools": [WEATHER]})
    return rows


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}
    return {**env, "TOKENIZERS_PARALLELISM": "false"}


def _run(*cmd: str, timeout: float = 300) -> str:
    r = subprocess.run(
        [sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env()
    )
    assert r.returncode == 0, f"{' '.join(cmd)}\n{(r.stdout + r.stderr)[-4000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's folder: src/ (the chats), data/ (prepared), base/, run/ (the training), hf/ (the export)."""
    root = tmp_path_factory.mktemp("toolcall")
    (root / "src").mkdir()
    rows = _rows(400, random.Random(0))
    (root / "src" / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _run("data/toolcall/prepare.py", "--source", str(root / "src" / "chats.jsonl"), "--out",
               str(root / "data"), "--val-fraction", "0")  # fmt: skip
    assert "read 400 rows, wrote 400 train + 0 val conversations, skipped 0" in out
    # The tokenizer learns from the corpus's conversations rendered with their tools (as training
    # renders them), so qwen3's tools prompt is pieces, not letters: a chat is ~250 tokens, not ~500.
    _run("pretrained/tiny/prepare.py", "--arch", "qwen3", "--corpus", str(root / "data" / "train.jsonl"),
         "--vocab-size", "600", "--layers", "2", "--hidden", "64", "--heads", "4",
         "--out", str(root / "base"))  # fmt: skip
    log = _run(
        "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}", "template=qwen3",
        f"train_files=[{root / 'data' / 'train.jsonl'}]", f"output_dir={root / 'run'}",
        f"cache_dir={root / 'cache'}", "max_length=512", "micro_batch_size=4", f"max_steps={STEPS}",
        "learning_rate=5e-3", "warmup_steps=10", "min_lr_ratio=0.05", "save_every=0", "log_every=25",
        "--num-gpus", "0", "--cpu-ranks", "2", "--master-port", "0",
        timeout=600,
    )  # fmt: skip
    (root / "launch.log").write_text(log)
    assert "400 conversations kept" in log and "dropped 0 over 512 tokens" in log
    assert "2 rank(s)" in log
    _run(
        "tools/convert_to_hf.py", "--checkpoint", str(root / "run" / "checkpoints"), "--out", str(root / "hf")
    )
    return root


@contextlib.contextmanager
def _serve(model: Path, log: Path, key: str) -> Iterator[str]:
    """inference/serve.py on `model` on a free loopback port (greedy, up to 80 tokens); yields its URL."""
    args = (
        "--api-key",
        key,
        "--model-name",
        "weather",
        "--max-tokens",
        "80",
        "--no-sample",
        "--device",
        "cpu",
    )
    with serve_subprocess(model, log, *args) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(trained: Path):
    with _serve(trained / "hf", trained / "serve.log", "toolcall-key") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="toolcall-key", max_retries=0, timeout=120)


def _ask(client, messages: list, **kw):
    return client.chat.completions.create(
        model="weather", messages=messages, tools=[WEATHER], temperature=0, **kw
    )


def _weather(city: str) -> list:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


def test_the_launcher_trained_the_tool_data_to_a_low_loss(trained: Path):
    rows = [json.loads(x) for x in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == list(range(25, STEPS + 1, 25))
    assert all(math.isfinite(v) for _, v in losses)
    assert losses[-1][1] < 0.01, losses  # ~0.0005: every trained token, the copied city too
    meta = json.loads((trained / "hf" / "chatkit.json").read_text())
    assert (meta["template"], meta["step"], meta["layout"]["world"]) == ("qwen3", STEPS, 2)


@pytest.mark.parametrize("city", ["Lima", "Oslo"])
def test_the_served_export_calls_the_tool_the_data_teaches(client, city: str):
    choice = _ask(client, _weather(city)).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": city}
    assert choice.message.model_extra["reasoning_content"] == THOUGHT


def test_the_call_streams_as_openai_streams_one(client):
    whole = _ask(client, _weather("Cairo")).choices[0].message
    chunks = list(_ask(client, _weather("Cairo"), stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == THOUGHT
    assert not "".join(d.content or "" for d in deltas)
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(calls) == 2  # the call's head (index, id, type, name), then its arguments
    head, args = calls[0][0], calls[1][0]
    assert (head.index, head.type, head.function.name, head.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert head.id.startswith("call_") and args.index == 0 and args.id is None
    assert (
        json.loads(args.function.arguments)
        == {"city": "Cairo"}
        == json.loads(whole.tool_calls[0].function.arguments)
    )
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


def test_the_tool_result_sent_back_is_answered(client):
    messages = _weather("Rome")
    reply = _ask(client, messages).choices[0].message
    (call,) = reply.tool_calls
    # the reply goes back as the client returned it (content null, tool_calls, reasoning_content)
    messages += [reply, {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "cloudy"})}]
    answer = _ask(client, messages).choices[0]
    assert (answer.message.content, answer.finish_reason) == ("It is cloudy in Rome.", "stop")
    assert not answer.message.tool_calls
    chunks = list(_ask(client, messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is cloudy in Rome."
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


def test_a_greeting_is_answered_as_text_and_tool_choice_none_calls_nothing(client):
    r = _ask(client, [{"role": "user", "content": "hi"}]).choices[0]
    assert (r.message.content, r.finish_reason) == ("hello", "stop")
    assert not r.message.tool_calls and "reasoning_content" not in r.message.model_extra
    r = _ask(client, _weather("Lima"), tool_choice="none").choices[0]
    assert not r.message.tool_calls and r.finish_reason != "tool_calls"
