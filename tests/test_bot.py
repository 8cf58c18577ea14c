"""The shell bot: ChatShell in-process, inference/bot.py with piped stdin, and on a pseudo-terminal."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatkit.bot import HELP, ChatShell, run_piped
from chatkit.chat import ChatEngine, GenerationParams, with_context
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
    shell = ChatShell(engine, dataclasses.replace(GREEDY), system, out=out)  # /set must not change GREEDY
    run_piped(shell, io.StringIO("".join(x + "\n" for x in lines)))
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _interrupt(fd: int, buf: bytearray, start: int) -> int:
    """Press Ctrl-C until a fresh prompt shows after start; return its index.

    One press is what a user makes, but CPython's readline loop has a window (after it handles a
    key, before it blocks in select again) where a SIGINT only sets a flag and is not acted on until
    the next key. A user would press again; so does the test. An extra press at a fresh prompt only
    prints another prompt, so the checks that follow hold either way."""
    for _ in range(6):
        os.write(fd, b"\x03")
        with contextlib.suppress(AssertionError):
            return _read_until(fd, buf, b">>> ", start, timeout=5)
    return _read_until(fd, buf, b">>> ", start, timeout=0)  # fails, showing what was printed


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so that ^C sends SIGINT."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.slow
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
        cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=_env(), preexec_fn=_own_terminal
    )
    os.close(slave)
    buf = bytearray()
    try:
        first = _read_until(master, buf, b">>> ", 0, timeout=120)
        assert b"/help for commands" in buf[:first]  # the interactive banner
        os.write(master, b"hello\n")
        second = _read_until(master, buf, b">>> ", first + 4, timeout=60)
        # Ctrl-C during a long reply stops it and comes back to the prompt; at the prompt it drops the line.
        os.write(master, b"/set max_tokens 480\n")  # a long reply: ^C lands while it runs
        at = _read_until(master, buf, b">>> ", second + 4, timeout=30)
        os.write(master, b"count\n")
        _read_until(master, buf, b"count", at + 4, timeout=30)
        started = len(buf)
        while len(buf) <= started + 2:  # some of the reply has been shown
            buf.extend(os.read(master, 64))
        after_stop = _interrupt(master, buf, started)
        os.write(master, b"half a line")
        _read_until(master, buf, b"half a line", after_stop, timeout=30)  # echoed: the prompt is reading
        after_drop = _interrupt(master, buf, after_stop + 4)
        os.write(master, b"/undo\n")
        _read_until(master, buf, b"(took back the last turn)", after_drop, timeout=30)
        os.write(master, b"/hyperparameters\n")
        _read_until(master, buf, b"top_p: 1.0\r\n>>> ", after_drop, timeout=30)
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


# --- the commands OpenChatKit did not have, in-process ------------------------------------------


def new_shell(engine, **kw) -> tuple[ChatShell, io.StringIO]:
    out = io.StringIO()
    return ChatShell(engine, dataclasses.replace(GREEDY), out=out, **kw), out


def test_regen_and_undo(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine)
    shell.handle("/regen")
    shell.handle("/undo")
    assert out.getvalue() == "(nothing to regenerate)\n(nothing to undo)\n"
    r1 = shell.say("hello")
    before = list(shell.history)
    shell.handle("/regen")  # greedy: the same reply replaces the old one
    assert shell.history == before and out.getvalue().endswith(r1 + "\n")
    shell.say("again")
    shell.handle("/undo")
    assert shell.history == before
    shell.handle("/undo")
    assert shell.history == []


def test_system_command(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine)
    shell.handle("/system")
    shell.say("hi")
    shell.handle("/system Be brief.")
    assert shell.history[0] == Message("system", "Be brief.") and len(shell.history) == 3
    shell.handle("/system Be kind.")
    assert shell.history[0] == Message("system", "Be kind.") and len(shell.history) == 3
    shell.handle("/system")
    shell.handle("/reset")
    assert shell.history == [Message("system", "Be kind.")]
    lines = out.getvalue().splitlines()
    assert lines[0] == "(no system prompt)" and "Be kind." in lines


def test_set_command(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine)
    for line in [
        "/set temperature 0.3",
        "/set top_k 5",
        "/set top_p 0.9",
        "/set max_tokens 3",
        "/set sample on",
    ]:
        shell.handle(line)
    assert shell.params == GenerationParams(
        max_new_tokens=3, sample=True, temperature=0.3, top_k=5, top_p=0.9
    )
    assert out.getvalue().splitlines() == [
        "temperature: 0.3", "top_k: 5", "top_p: 0.9", "max_new_tokens: 3", "sample: True",
    ]  # fmt: skip
    out.truncate(0), out.seek(0)
    for bad in ["/set temperature hot", "/set top_p 0", "/set top_p 1.5", "/set max_tokens 0", "/set sample maybe",
                "/set top_k -1", "/set colour red", "/set", "/set temperature"]:  # fmt: skip
        shell.handle(bad)
    lines = out.getvalue().splitlines()
    assert len(lines) == 9
    assert all(x.startswith("bad value") for x in lines[:6]) and all(x.startswith("usage") for x in lines[6:])
    assert shell.params.max_new_tokens == 3  # unchanged by the bad values


def test_save_and_load_round_trip(tiny_engine: ChatEngine, tmp_path: Path):
    shell, out = new_shell(tiny_engine, system="Be brief.")
    shell.say("hello")
    file = tmp_path / "conv.jsonl"
    shell.handle(f"/save {file}")
    saved = [json.loads(x) for x in file.read_text().splitlines()]
    assert len(saved) == 1 and saved[0]["messages"] == [m.to_dict() for m in shell.history]
    other, out2 = new_shell(tiny_engine)
    other.handle(f"/load {file}")
    assert other.history == shell.history and other.system == "Be brief."
    assert out2.getvalue() == f"(loaded 3 messages from {file})\n"
    # The loaded conversation goes on exactly as the saved one would.
    assert other.say("more") == shell.say("more")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    other.handle(f"/load {bad}")
    other.handle(f"/load {tmp_path / 'missing.jsonl'}")
    other.handle(f"/save {bad / 'f.jsonl'}")  # a parent that is a file
    errors = out2.getvalue().splitlines()[-3:]
    assert all(x.startswith("error: ") for x in errors) and "role" in errors[0]


def test_raw_say_is_not_kept(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine)
    shell.handle("/raw_say <human>: hi\n<bot>:")
    expected = "".join(tiny_engine.complete("<human>: hi\n<bot>:", GREEDY))
    assert out.getvalue() == expected + "\n" and shell.history == []
    shell.handle("/raw_say")
    assert out.getvalue().endswith("usage: /raw_say TEXT\n")


def test_context_provider_adds_passages_for_one_turn_only(tiny_engine: ChatEngine):
    seen: list[list[Message]] = []

    def provider(history: list[Message]) -> list[str]:
        seen.append(list(history))
        return [f"passage about {history[-1].content}", "another passage"]

    shell, out = new_shell(tiny_engine, system="Be brief.", context_provider=provider)
    shell.handle("/context")
    reply = shell.say("stone")
    assert seen == [[Message("system", "Be brief."), Message("user", "stone")]]
    prompt = with_context(seen[0], provider(seen[0]))
    assert prompt[0] == Message(
        "system", "Be brief.\n\nRelevant passages:\npassage about stone\n\nanother passage"
    )
    assert reply == tiny_engine.reply(prompt, GREEDY)
    assert shell.history == [
        Message("system", "Be brief."),
        Message("user", "stone"),
        Message("assistant", reply),
    ]
    shell.handle("/context")
    assert out.getvalue().splitlines()[0] == "(nothing retrieved yet)"
    assert out.getvalue().endswith("[1] passage about stone\n[2] another passage\n")
    plain, out2 = new_shell(tiny_engine)
    plain.handle("/context")
    assert out2.getvalue() == "(no retrieval)\n"
    assert with_context([Message("user", "x")], ["p"])[0] == Message("system", "Relevant passages:\np")
    assert with_context([Message("user", "x")], None) == [Message("user", "x")]


class InterruptAfter:
    """The real engine, with a Ctrl-C (KeyboardInterrupt) arriving after k pieces of a reply."""

    def __init__(self, engine: ChatEngine, k: int):
        self.engine, self.k = engine, k

    def stream(self, *args, **kwargs):
        for i, piece in enumerate(self.engine.stream(*args, **kwargs)):
            if i == self.k:
                raise KeyboardInterrupt
            yield piece


def test_ctrl_c_keeps_what_was_said(tiny_engine: ChatEngine):
    full = tiny_engine.reply([Message("user", "hello")], GREEDY)
    pieces = list(tiny_engine.stream([Message("user", "hello")], GREEDY))
    assert len(pieces) > 2
    shell, out = new_shell(InterruptAfter(tiny_engine, 2))
    said = shell.say("hello")
    assert said == "".join(pieces[:2]) and full.startswith(said) and said != full
    assert shell.history[-1] == Message("assistant", said)
    assert out.getvalue() == said + "\n"


def test_turn_too_long_is_reported_and_dropped(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine)
    assert shell.say("word " * 600) == ""
    assert shell.history == [] and out.getvalue().startswith("error: ") and "context" in out.getvalue()


def test_history_is_trimmed_but_kept_whole(tiny_engine: ChatEngine):
    shell, _ = new_shell(tiny_engine, system="You are a calculator.")
    shell.params.max_new_tokens = 4
    for i in range(40):
        shell.say(f"What is {i} + {i + 10}? (turn {i})")
    assert len(shell.history) == 81  # the shell keeps everything; the engine trims the prompt
    assert len(tiny_engine.prompt_ids(shell.history, 4)) + 4 <= 512


def test_last_line_without_newline_and_end_of_input(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine)
    run_piped(shell, io.StringIO("hello"))
    assert out.getvalue() == tiny_engine.reply([Message("user", "hello")], GREEDY) + "\n"


# --- every command through pipes, and Ctrl-C -----------------------------------------------------


@pytest.fixture(scope="module")
def every_command(
    tiny_model_dir: Path, tmp_path_factory
) -> tuple[list[str], subprocess.CompletedProcess[bytes]]:
    d = tmp_path_factory.mktemp("bot")
    load = d / "load.jsonl"
    load.write_text(json.dumps({"messages": [{"role": "system", "content": "Be kind."},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")  # fmt: skip
    lines = [
        "/help", "hello", "/regen", "/undo", "hello", "/system Be brief.", "/system", "/set temperature 0.2",
        "/set max_tokens 5", "/set sample off", "/hyperparameters", "again", "/raw_prompt", "/raw_say hi there",
        f"/save {d / 'saved.jsonl'}", f"/load {load}", "/raw_prompt", "more", "/context", "/reset", "/raw_prompt",
    ]  # fmt: skip
    return lines, run_bot(tiny_model_dir, lines)


@pytest.mark.slow
def test_bot_piped_every_command(every_command, tiny_engine: ChatEngine):
    lines, proc = every_command
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    out = decode(proc)
    assert out == expected_output(tiny_engine, lines)
    assert out.startswith(HELP + "\n")
    assert "max_new_tokens: 5\nsample: False\ntemperature: 0.2\n" in out
    assert "(no retrieval)\n" in out and out.endswith("Be kind.\n<bot>:\n")


@pytest.mark.slow
def test_bot_piped_ctrl_c_stops_the_reply(tiny_model_dir: Path, tmp_path: Path, tiny_engine: ChatEngine):
    save = tmp_path / "after.jsonl"
    cmd = [sys.executable, BOT, "--model", str(tiny_model_dir), "--no-sample", "--max-tokens", "480"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=_env()
    )
    try:
        proc.stdin.write(b"count\n")
        proc.stdin.flush()
        assert proc.stdout.read1(4096)  # the reply has started
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(f"/save {save}\n/quit\n".encode())
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = json.loads(save.read_text())["messages"][-1]
    full = tiny_engine.reply([Message("user", "count")], GenerationParams(max_new_tokens=480, sample=False))
    assert said["role"] == "assistant" and full.startswith(said["content"])
    assert len(said["content"]) < len(full)
