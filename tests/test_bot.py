"""The shell bot: ChatShell in-process, inference/bot.py with piped stdin, and on a pseudo-terminal."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatkit.bot import HELP, ChatShell, run_piped
from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Message

REPO = Path(__file__).resolve().parents[1]
BOT = "inference/bot.py"
MAX_TOKENS = 8
GREEDY = GenerationParams(max_new_tokens=MAX_TOKENS, sample=False)
HINT = "unknown command /nonsense; /help lists them"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONIOENCODING="utf-8", TERM="dumb", TOKENIZERS_PARALLELISM="false")
    return env


def run_bot(model: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, BOT, "--model", str(model), "--no-sample", "--max-tokens", str(MAX_TOKENS)]
    stdin = "".join(line + "\n" for line in lines).encode()
    return subprocess.run([*cmd, *extra], input=stdin, cwd=REPO, capture_output=True, timeout=120, env=_env())


def expected_output(engine: ChatEngine, lines: list[str], system: str | None = None) -> str:
    """What the bot prints for these lines, computed in-process with the same engine settings."""
    out = io.StringIO()
    run_piped(ChatShell(engine, GREEDY, system, out=out), io.StringIO("".join(x + "\n" for x in lines)))
    return out.getvalue()


def decode(proc: subprocess.CompletedProcess[bytes]) -> str:
    # Bytes, not text mode: a random model's reply may hold "\r", which universal newlines would change.
    return proc.stdout.decode("utf-8")


# --- ChatShell in-process -------------------------------------------------------------------------


def test_shell_history_grows_by_user_and_assistant(tiny_engine: ChatEngine):
    out = io.StringIO()
    shell = ChatShell(tiny_engine, GREEDY, out=out)
    assert shell.history == []
    r1 = shell.say("What is 2 + 3?")
    assert shell.history == [Message("user", "What is 2 + 3?"), Message("assistant", r1)]
    r2 = shell.say("And 4 + 4?")
    assert len(shell.history) == 4
    assert shell.history[2:] == [Message("user", "And 4 + 4?"), Message("assistant", r2)]
    assert out.getvalue() == r1 + "\n" + r2 + "\n"


def test_shell_streamed_output_equals_reply(tiny_engine: ChatEngine):
    history = [Message("user", "hello")]
    expected = tiny_engine.reply(history, GREEDY)
    for stream in (True, False):
        out = io.StringIO()
        shell = ChatShell(tiny_engine, GREEDY, stream=stream, out=out)
        assert shell.say("hello") == expected
        assert out.getvalue() == expected + "\n"


def test_shell_reply_sees_the_whole_history(tiny_engine: ChatEngine):
    shell = ChatShell(tiny_engine, GREEDY, system="Be brief.", out=io.StringIO())
    r1 = shell.say("hi")
    r2 = shell.say("again")
    msgs = [
        Message("system", "Be brief."),
        Message("user", "hi"),
        Message("assistant", r1),
        Message("user", "again"),
    ]
    assert r2 == tiny_engine.reply(msgs, GREEDY)


def test_shell_seeded_sampling_is_reproducible(tiny_engine: ChatEngine):
    p = GenerationParams(max_new_tokens=MAX_TOKENS, sample=True, temperature=1.0, top_k=0)
    a = ChatShell(tiny_engine, p, out=io.StringIO(), seed=5)
    b = ChatShell(tiny_engine, p, out=io.StringIO(), seed=5)
    assert [a.say("hi"), a.say("more")] == [b.say("hi"), b.say("more")]


def test_shell_commands(tiny_engine: ChatEngine):
    out = io.StringIO()
    shell = ChatShell(tiny_engine, GREEDY, system="Be brief.", out=out)
    assert shell.history == [Message("system", "Be brief.")]
    assert shell.handle("") is True and shell.handle("   ") is True
    assert out.getvalue() == ""  # empty lines do nothing
    assert shell.history == [Message("system", "Be brief.")]
    assert shell.handle("/help") is True
    assert out.getvalue() == HELP + "\n"
    shell.handle("hi")
    assert len(shell.history) == 3
    assert shell.handle("/reset") is True
    assert shell.history == [Message("system", "Be brief.")]  # the system prompt survives a reset
    assert out.getvalue().endswith("(conversation reset)\n")
    assert shell.handle("/nonsense now") is True
    assert out.getvalue().endswith(HINT + "\n")
    assert shell.handle("/quit") is False
    assert shell.handle("  /quit  ") is False


def test_shell_hyperparameters_lists_every_setting(tiny_engine: ChatEngine):
    out = io.StringIO()
    params = GenerationParams(max_new_tokens=17, sample=True, temperature=0.3, top_k=7, top_p=0.9)
    ChatShell(tiny_engine, params, out=out).handle("/hyperparameters")
    assert out.getvalue().splitlines() == [
        "max_new_tokens: 17",
        "sample: True",
        "temperature: 0.3",
        "top_k: 7",
        "top_p: 0.9",
    ]


def test_run_piped_stops_at_quit(tiny_engine: ChatEngine):
    out = io.StringIO()
    shell = ChatShell(tiny_engine, GREEDY, out=out)
    run_piped(shell, io.StringIO("hi\n/quit\nnot answered\n"))
    assert [m.content for m in shell.history if m.role == "user"] == ["hi"]


# --- inference/bot.py with piped stdin ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_turns(tiny_model_dir: Path) -> tuple[list[str], subprocess.CompletedProcess[bytes]]:
    lines = ["hello", "", "   ", "What is 2 + 3?", ""]
    return lines, run_bot(tiny_model_dir, lines)


def test_bot_piped_two_lines_two_replies(two_turns, tiny_engine: ChatEngine):
    lines, proc = two_turns
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    out = decode(proc)
    assert out == expected_output(tiny_engine, lines)
    # One reply line per user line; the empty lines got none.
    r1 = tiny_engine.reply([Message("user", "hello")], GREEDY)
    r2 = tiny_engine.reply(
        [Message("user", "hello"), Message("assistant", r1), Message("user", "What is 2 + 3?")], GREEDY
    )
    assert "\n" not in r1 + r2  # so that lines and replies correspond one to one
    assert out.split("\n") == [r1, r2, ""]


@pytest.fixture(scope="module")
def commands_run(tiny_model_dir: Path) -> tuple[list[str], subprocess.CompletedProcess[bytes]]:
    lines = [
        "/hyperparameters",
        "hello there",
        "/raw_prompt",
        "/reset",
        "/raw_prompt",
        "/nonsense",
        "/quit",
        "never answered",
        "/raw_prompt",
    ]
    return lines, run_bot(tiny_model_dir, lines, "--system", "Be brief.")


def test_bot_commands_output_matches_in_process_shell(commands_run, tiny_engine: ChatEngine):
    lines, proc = commands_run
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert decode(proc) == expected_output(tiny_engine, lines, system="Be brief.")


def test_bot_hyperparameters(commands_run):
    out = decode(commands_run[1])
    assert out.startswith(
        f"max_new_tokens: {MAX_TOKENS}\nsample: False\ntemperature: 0.6\ntop_k: 40\ntop_p: 1.0\n"
    )


def test_bot_raw_prompt_reset_unknown_and_quit(commands_run, tiny_engine: ChatEngine):
    out = decode(commands_run[1])
    reply = tiny_engine.reply([Message("system", "Be brief."), Message("user", "hello there")], GREEDY)
    # After one turn: the system prompt, the turn, the reply, and the generation prompt.
    first_prompt = f"Be brief.\n<human>: hello there\n<bot>: {reply}<|endoftext|>\n<bot>:\n"
    reset_prompt = "Be brief.\n<bot>:\n"
    assert out.count(first_prompt) == 1
    before, after = out.split("(conversation reset)\n")
    assert before.endswith(first_prompt)
    assert "<human>: hello there" in before
    # After /reset: only the system prompt is left, no earlier turn.
    assert after.startswith(reset_prompt)
    assert "<human>:" not in after and "hello there" not in after
    # Unknown command: a hint. /quit: nothing after it is answered or run.
    assert after == reset_prompt + HINT + "\n"
    assert "never answered" not in out


def test_bot_system_prompt_appears_in_raw_prompt(commands_run):
    out = decode(commands_run[1])
    assert out.count("Be brief.\n") == 2  # in both /raw_prompt outputs


# --- inference/bot.py on a pseudo-terminal -------------------------------------------------------


def _read_until(fd: int, buf: bytearray, needle: bytes, start: int, timeout: float) -> int:
    """Read from fd into buf until needle occurs at or after start; return its index."""
    deadline = time.monotonic() + timeout
    while (i := buf.find(needle, start)) < 0:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {bytes(buf)[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed while waiting for {needle!r}; got {bytes(buf)!r}")
            buf += chunk
    return i


def test_bot_on_a_terminal(tiny_model_dir: Path, tiny_engine: ChatEngine):
    pty = pytest.importorskip("pty", reason="the pty module is unavailable on this platform")
    try:
        master, slave = pty.openpty()
    except OSError as e:
        pytest.skip(f"no pseudo-terminal available: {e}")
    cmd = [
        sys.executable,
        BOT,
        "--model",
        str(tiny_model_dir),
        "--no-sample",
        "--max-tokens",
        str(MAX_TOKENS),
    ]
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=_env(), start_new_session=True
    )
    os.close(slave)
    buf = bytearray()
    try:
        first = _read_until(master, buf, b">>> ", 0, timeout=120)
        assert b"/help for commands" in buf[:first]  # the interactive banner
        os.write(master, b"hello\n")
        second = _read_until(master, buf, b">>> ", first + 4, timeout=60)
        os.write(master, b"\x04")  # Ctrl-D on an empty line: end of input
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    # The terminal turns "\n" into "\r\n"; the reply streamed between the two prompts.
    exchange = bytes(buf[first + 4 : second]).replace(b"\r\n", b"\n").decode("utf-8")
    reply = tiny_engine.reply([Message("user", "hello")], GREEDY)
    assert reply and exchange.endswith(reply + "\n")
    assert exchange.startswith("hello")  # the echoed input line
