"""Shared fixtures: the shared test data folder and small tokenizers whose ids can be worked out by hand."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|padding|>"

# Ids are what the tests write as literals: keep this table and the tests in step.
WORDLEVEL_VOCAB: dict[str, int] = {
    "[UNK]": 0,
    EOS: 1,
    PAD: 2,
    "<human>:": 3,
    "<bot>:": 4,
    "\n": 5,
    "hi": 6,
    "there": 7,
    "hello": 8,
    "how": 9,
    "are": 10,
    "you": 11,
    "fine": 12,
    "thanks": 13,
    "be": 14,
    "brief": 15,
}


def _build_wordlevel_tokenizer(eos_token: str | None = EOS, pad_token: str | None = PAD):
    tok = Tokenizer(WordLevel(dict(WORDLEVEL_VOCAB), unk_token="[UNK]"))
    # Spaces only separate words (they never become tokens); every "\n" is a token of its own. So
    # "<human>: hi there\n<bot>: hello<|endoftext|>\n" -> <human>: hi there \n <bot>: hello EOS \n.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" +"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    # Special added tokens are matched inside running text before pre-tokenization.
    tok.add_special_tokens([EOS, PAD])
    kwargs = {}
    if eos_token is not None:
        kwargs["eos_token"] = eos_token
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture
def make_wordlevel_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """Factory for variants of the word-level tokenizer (e.g. one without an eos token)."""
    return _build_wordlevel_tokenizer


@pytest.fixture
def wordlevel_tokenizer() -> PreTrainedTokenizerFast:
    tok = _build_wordlevel_tokenizer()
    # Guard the hand-computed ids the tests rely on.
    assert tok.eos_token == EOS and tok.eos_token_id == 1
    assert tok.pad_token == PAD and tok.pad_token_id == 2
    assert tok.bos_token is None
    return tok


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (expected ../shared/data beside the repository)")
    return path


@pytest.fixture
def neox_tokenizer(shared_data: Path) -> PreTrainedTokenizerFast:
    """The GPT-NeoX-20B tokenizer OpenChatKit models use; a fresh instance per test (tests set chat_template)."""
    file = shared_data / "20B_tokenizer.json"
    if not file.is_file():
        pytest.skip(f"{file} not found")
    return PreTrainedTokenizerFast(tokenizer_file=str(file), eos_token=EOS, bos_token=EOS)


@functools.cache
def _local_bpe_json() -> str:
    """A byte-level BPE (GPT-NeoX style: digits split, <|endoftext|>, <|padding|>) trained here on the
    synthetic chat tasks and some prose: what the data tests use, so they never depend on ../shared."""
    from chatkit.datasets.synthetic import make_splits
    from chatkit.models import train_tokenizer
    from chatkit.templates import get_template

    tpl = get_template("openchatkit")
    train, _ = make_splits(2000, 0)
    texts = [tpl.render(c.messages, EOS, EOS) for c in train]
    texts += ["How are you today? Fine, thanks: be brief.  Two  spaces,\ttabs and\nnew lines."] * 50
    return train_tokenizer(texts, vocab_size=2000, extra_tokens=tpl.special_tokens).backend_tokenizer.to_str()


@pytest.fixture
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A locally trained byte-level BPE tokenizer (2,000 pieces); a fresh instance per test."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_local_bpe_json()), eos_token=EOS, bos_token=EOS, pad_token=PAD
    )


# --- a real tiny model (random weights, locally trained BPE tokenizer) -----------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random GPT-NeoX Hugging Face folder (2 layers, hidden 64, vocab 300, context 512)
    with a BPE tokenizer trained on the synthetic tasks and chatkit.json naming openchatkit."""
    from chatkit.pretrained import prepare_tiny

    out = tmp_path_factory.mktemp("tiny_model") / "tiny"
    prepare_tiny(corpus=[], out=str(out), vocab_size=300, layers=2, hidden=64, heads=4)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    """A ChatEngine on the tiny model, on CPU (shared: the engine keeps no per-conversation state)."""
    from chatkit.chat import ChatEngine

    return ChatEngine.from_pretrained(tiny_model_dir, device="cpu")


# --- the served chat (inference/serve.py on the tiny model, a real uvicorn on 127.0.0.1) -----------


@contextlib.contextmanager
def serve_subprocess(
    model: Path, log: Path, *args: str, env: dict | None = None
) -> Iterator[tuple[str, Any]]:
    """inference/serve.py on `model` (with `args`) in a subprocess on a free loopback port, its output
    in `log`; yields (url, process) once /health answers, and stops it afterwards."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "inference/serve.py", "--model", str(model), "--port", str(port), *args]
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"serve.py exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"serve.py did not answer /health in 120 s:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.25)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """inference/serve.py in a subprocess on a free loopback port, with an API key and greedy defaults
    (max 8 tokens); yields an object with .url, .key and .log (the server's output file)."""
    import types

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    key = "test-key-123"
    args = ("--api-key", key, "--max-tokens", "8", "--no-sample", "--device", "cpu")
    with serve_subprocess(tiny_model_dir, log, *args) as (url, proc):
        yield types.SimpleNamespace(url=url, key=key, log=log, proc=proc)


@pytest.fixture
def caplog_loguru():
    """Messages logged through loguru during the test (chatkit's library logs with loguru)."""
    from loguru import logger

    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    yield lines
    logger.remove(handler)
