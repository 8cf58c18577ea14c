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

from chatkit.bot import EMPTY_REPLY, HELP, ChatShell, run_piped
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
    # After one turn: the prompt that turn's reply was given (the reply is in no prompt yet).
    first_prompt = "Be brief.\n<human>: hello there\n<bot>:\n"
    reset_prompt = "(no prompt yet: the first one is made when you send a message)\n"
    assert out.count(first_prompt) == 1
    before, after = out.split("(conversation reset)\n")
    assert before.endswith(f"\n{reply}\n{first_prompt}")
    assert "<human>: hello there" in before
    # After /reset: only the system prompt is left, no earlier turn.
    assert after.startswith(reset_prompt)
    assert "<human>:" not in after and "hello there" not in after
    # Unknown command: a hint. /quit: nothing after it is answered or run.
    assert after == reset_prompt + HINT + "\n"
    assert "never answered" not in out


def test_bot_system_prompt_appears_in_raw_prompt(commands_run):
    out = decode(commands_run[1])
    assert out.count("Be brief.\n") == 1  # in the /raw_prompt after the reply; none after /reset


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


class NotingProvider:
    """A retrieval hook as chatkit.retrieval's: a `note` after a call that had to cut passages, and
    a `describe()` of what the model was given."""

    def __init__(self):
        self.note: str | None = None

    def __call__(self, messages: list[Message]) -> list[str]:
        self.note = "(retrieval: passage 1 shortened to fit)"
        return ["a passage …"]

    def describe(self) -> str:
        return "[1] score 0.500, row 3, notes.md, shortened to fit the context\na passage …"


def test_the_shell_says_what_retrieval_notes_and_context_shows_its_account(tiny_engine: ChatEngine):
    provider = NotingProvider()
    shell, out = new_shell(tiny_engine, context_provider=provider)
    reply = shell.say("stone")
    assert _lines(out)[0] == "(retrieval: passage 1 shortened to fit)" and reply
    shell.handle("/context")
    assert out.getvalue() == provider.describe() + "\n"


class InterruptAfter:
    """The real engine, with a Ctrl-C (KeyboardInterrupt) arriving after k pieces of a reply."""

    def __init__(self, engine: ChatEngine, k: int):
        self.engine, self.k = engine, k

    def stream(self, *args, **kwargs):
        for i, piece in enumerate(self.engine.stream(*args, **kwargs)):
            if i == self.k:
                raise KeyboardInterrupt
            yield piece

    def __getattr__(self, name: str):  # everything else is the real engine's
        return getattr(self.engine, name)


def test_ctrl_c_keeps_what_was_said(tiny_engine: ChatEngine):
    full = tiny_engine.reply([Message("user", "hello")], GREEDY)
    pieces = list(tiny_engine.stream([Message("user", "hello")], GREEDY))
    assert len(pieces) > 2
    shell, out = new_shell(InterruptAfter(tiny_engine, 2))
    said = shell.say("hello")
    assert said == "".join(pieces[:2]) and full.startswith(said) and said != full
    assert shell.history[-1] == Message("assistant", said)
    assert out.getvalue() == said + "\n"


class InterruptWhileEncoding(InterruptAfter):
    """Ctrl-C lands while the prompt is being tokenized, before any piece of the reply exists."""

    def prompt_messages(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_ctrl_c_before_the_reply_begins_keeps_the_shell(tiny_engine: ChatEngine):
    shell, out = new_shell(InterruptWhileEncoding(tiny_engine, 0))
    assert shell.say("hello") == ""
    assert shell.history == [] and out.getvalue() == "(stopped before the reply began)\n"
    shell.engine = tiny_engine  # the shell goes on: the next turn is answered
    assert shell.say("hello") == tiny_engine.reply([Message("user", "hello")], GREEDY)


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
    saved = next(Path(x.split(" ", 1)[1]) for x in lines if x.startswith("/save "))
    saved.unlink()  # the in-process shell saves there too, and /save never replaces a file
    assert out == expected_output(tiny_engine, lines)
    assert out.startswith(HELP + "\n")
    assert "max_new_tokens: 5\nsample: False\ntemperature: 0.2\n" in out
    assert "(no retrieval)\n" in out  # and no prompt after /reset: the loaded system prompt is no prompt yet
    assert out.endswith(
        "(conversation reset)\n(no prompt yet: the first one is made when you send a message)\n"
    )


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


# --- /save and /load safety, what the prompt leaves out, empty replies ----------------------------


def _lines(out: io.StringIO) -> list[str]:
    lines = out.getvalue().splitlines()
    out.truncate(0), out.seek(0)
    return lines


def test_save_never_replaces_a_file_unless_told(tiny_engine: ChatEngine, tmp_path: Path):
    data = tmp_path / "train.jsonl"  # a data file of 100 conversations
    data.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(100))
    )
    before = data.read_bytes()
    shell, out = new_shell(tiny_engine)
    shell.say("hello")
    _lines(out)
    shell.handle(f"/save {data}")
    assert _lines(out) == [f"error: {data} exists; /save! {data} replaces it"]
    assert data.read_bytes() == before
    shell.handle(f"/save! {data}")
    assert _lines(out) == [f"(saved 2 messages to {data}, replacing it)"]
    assert [json.loads(x)["messages"] for x in data.read_text().splitlines()] == [
        [m.to_dict() for m in shell.history]
    ]
    shell.handle(f"/save {tmp_path}")  # a folder is never a file to write
    assert _lines(out) == [f"error: {tmp_path} is a folder; name a file"]
    assert "/save! FILE" in HELP


def test_save_does_not_create_folders(tiny_engine: ChatEngine, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shell, out = new_shell(tiny_engine)
    shell.say("hello")
    _lines(out)
    for cmd, target in [("/save", "typo/../chat.jsonl"), ("/save!", "a/b/chat.jsonl")]:
        shell.handle(f"{cmd} {target}")
        folder = Path(target).parent
        assert _lines(out) == [
            f"error: cannot write {target}: {folder} does not exist (/save does not create folders)"
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder (and no file) was made
    shell.handle("/save chat.jsonl")  # a file in a folder that exists is fine, relative or not
    assert _lines(out) == ["(saved 2 messages to chat.jsonl)"] and (tmp_path / "chat.jsonl").is_file()
    shell.handle("/save!")
    assert _lines(out) == ["usage: /save! FILE"]


def test_load_of_a_bad_file_is_one_line_and_keeps_the_conversation(tiny_engine: ChatEngine, tmp_path: Path):
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    files = {
        "latin1.jsonl": (
            b"\n" + good.replace("yo", "caf\xe9").encode("latin-1") + b"\n",
            ":2: not UTF-8 (byte 0xe9 at column 87)",
        ),
        "binary.jsonl": (bytes(range(128, 256)) * 4, ":1: not UTF-8 (byte 0x80 at column 1)"),
        "cut.jsonl": (good[:30].encode() + b"\n", ":1: invalid JSON"),
        "deep.jsonl": (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: JSON nested too deeply to read"),
        "list.jsonl": (b'["hi", "yo"]\n', ":1: expected a JSON object, got list"),
        "role.jsonl": (
            good.replace('"user"', '"human"').encode() + b"\n",
            ":1: messages[0].role: must be one of",
        ),
    }
    shell, out = new_shell(tiny_engine, system="Be brief.")
    shell.say("hello")
    before = list(shell.history)
    _lines(out)
    for name, (data, message) in files.items():
        (path := tmp_path / name).write_bytes(data)
        shell.handle(f"/load {path}")
        lines = _lines(out)
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot load {path}{message}"), lines
        assert shell.history == before and shell.system == "Be brief."
    (empty := tmp_path / "empty.jsonl").write_text("\n\n")
    shell.handle(f"/load {empty}")
    shell.handle(f"/load {tmp_path}")
    shell.handle(f"/load {tmp_path / 'missing.jsonl'}")
    assert _lines(out) == [
        f"error: {empty} holds no conversation",
        f"error: cannot load {tmp_path}: Is a directory",
        f"error: cannot load {tmp_path / 'missing.jsonl'}: No such file or directory",
    ]
    assert shell.history == before
    shell.say("still here")  # the shell goes on with the same conversation
    assert shell.history[:3] == before and len(shell.history) == 5
    _lines(out)
    (bom := tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + b"not read\n")
    shell.handle(f"/load {bom}")  # a byte-order mark is fine, and only the first conversation is read
    assert _lines(out) == [f"(loaded 2 messages from {bom})"] and shell.history == [
        Message("user", "hi"), Message("assistant", "yo"),
    ]  # fmt: skip


def _outgrown(shell: ChatShell, turns: int = 30) -> None:
    for i in range(turns):
        shell.history += [
            Message("user", f"What is {i} + {i + 10}? (turn {i})"),
            Message("assistant", str(2 * i + 10)),
        ]


def test_shell_says_how_many_messages_the_prompt_left_out(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine, system="You are a calculator.")
    shell.say("hi")
    assert "left out" not in out.getvalue()  # nothing said while everything fits
    shell.reset()
    _outgrown(shell)
    _lines(out)
    reply = shell.say("And 7 + 8?")
    asked = shell.history[:-1]
    kept = tiny_engine.prompt_messages(asked, GREEDY.max_new_tokens)
    n = len(asked) - len(kept)
    assert n >= 2 and kept[0] == Message("system", "You are a calculator.")
    assert _lines(out) == [f"({n} earlier messages left out to fit the context)", reply]
    assert reply == tiny_engine.reply(kept, GREEDY)  # the reply saw exactly those messages
    assert len(shell.history) == 1 + 60 + 2  # the history itself keeps every turn


def test_raw_prompt_is_the_prompt_after_leaving_turns_out(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine, system="You are a calculator.")
    _outgrown(shell)
    shell.handle("/raw_prompt")
    asked = shell.history[:-1]  # the prompt of the history's last reply
    kept = tiny_engine.prompt_messages(asked, GREEDY.max_new_tokens)
    n = len(asked) - len(kept)
    text = out.getvalue()
    assert (
        text == f"({n} earlier messages left out to fit the context)\n" + tiny_engine.raw_prompt(kept) + "\n"
    )
    assert n > 0 and "(turn 0)" not in text and "(turn 29)" in text
    assert text.count("You are a calculator.") == 1  # the system prompt is kept
    ids = tiny_engine.tokenizer.encode(tiny_engine.raw_prompt(kept), add_special_tokens=False)
    assert len(ids) + GREEDY.max_new_tokens <= tiny_engine.context_length


def test_raw_prompt_after_a_reply_is_the_prompt_that_reply_was_given(tiny_engine: ChatEngine):
    """No text the model was not given: no `<bot>:` after the reply, where no user turn precedes it."""
    shell, out = new_shell(tiny_engine, system="Be brief.")
    shell.say("hello there")
    _lines(out)
    shell.handle("/raw_prompt")
    given = tiny_engine.tokenizer.decode(tiny_engine.prompt_ids(shell.history[:-1], MAX_TOKENS))
    assert out.getvalue() == given + "\n"
    assert given == "Be brief.\n<human>: hello there\n<bot>:"


def test_raw_prompt_of_a_turn_awaiting_its_reply_and_of_none(tiny_engine: ChatEngine):
    shell, out = new_shell(tiny_engine, system="Be brief.")
    reply = shell.say("hello there")
    shell.history.append(Message("user", "again"))  # as /load of a chat ending with the user's turn
    _lines(out)
    shell.handle("/raw_prompt")
    ids = tiny_engine.prompt_ids(shell.history, MAX_TOKENS)
    assert out.getvalue() == tiny_engine.tokenizer.decode(ids) + "\n"
    assert reply in out.getvalue() and out.getvalue().endswith("<human>: again\n<bot>:\n")
    shell.reset()
    _lines(out)
    shell.handle("/raw_prompt")  # only the system prompt: no prompt is made before a user turn
    assert _lines(out) == ["(no prompt yet: the first one is made when you send a message)"]


def test_raw_prompt_holds_the_passages_the_reply_was_given(tiny_engine: ChatEngine):
    passages = ["Zurich is a city in Switzerland."]
    shell, out = new_shell(tiny_engine, context_provider=lambda messages: passages)
    shell.say("where is zurich")
    _lines(out)
    shell.handle("/raw_prompt")
    given = with_context([Message("user", "where is zurich")], passages)
    assert out.getvalue() == tiny_engine.raw_prompt(given) + "\n"
    assert passages[0] in out.getvalue()
    shell.handle("/undo")  # the history is no longer what the reply left: no passages are claimed
    _lines(out)
    shell.handle("/raw_prompt")
    assert _lines(out) == ["(no prompt yet: the first one is made when you send a message)"]


class Silent:
    """The real engine, except that every reply is empty (as when the model says eos at once)."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine

    def stream(self, *args, **kwargs):
        return iter(())

    def complete(self, *args, **kwargs):
        return iter(())

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def test_empty_reply_is_marked(tiny_engine: ChatEngine):
    for stream in (True, False):
        out = io.StringIO()
        shell = ChatShell(Silent(tiny_engine), dataclasses.replace(GREEDY), stream=stream, out=out)
        assert shell.say("hello") == ""
        shell.handle("/raw_say hello")
        assert out.getvalue() == f"{EMPTY_REPLY}\n{EMPTY_REPLY}\n"
        assert shell.history == [Message("user", "hello"), Message("assistant", "")]


@pytest.mark.slow
def test_bot_piped_survives_bad_files_and_keeps_data(
    tiny_model_dir: Path, tmp_path: Path, tiny_engine: ChatEngine
):
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "keep me"}]}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    saved = tmp_path / "saved.jsonl"
    lines = [
        "hello",
        f"/load {latin1}",
        f"/save {data}",
        f"/save {tmp_path / 'no' / 'x.jsonl'}",
        f"/save {saved}",
    ]
    proc = run_bot(tiny_model_dir, lines)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    reply = tiny_engine.reply([Message("user", "hello")], GREEDY)
    assert decode(proc).splitlines() == [
        reply,
        f"error: cannot load {latin1}:1: not UTF-8 (byte 0xe9 at column 47)",
        f"error: {data} exists; /save! {data} replaces it",
        f"error: cannot write {tmp_path / 'no' / 'x.jsonl'}: {tmp_path / 'no'} does not exist (/save does not create folders)",
        f"(saved 2 messages to {saved})",
    ]
    assert data.read_text() == '{"messages": [{"role": "user", "content": "keep me"}]}\n'
    assert json.loads(saved.read_text())["messages"] == [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": reply},
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "tool",
    [[BOT], ["inference/serve.py", "--port", "0"], ["tools/evaluate.py", "--data", "held.jsonl"]],
    ids=["bot", "serve", "evaluate"],
)
def test_a_checkpoint_given_as_model_says_to_convert_it(tmp_path: Path, tool: list[str]):
    """Every tool that takes --model: one line saying what the path is and what to do, exit 1."""
    ckpt = tmp_path / "outputs" / "x" / "checkpoints"
    (ckpt / "step9").mkdir(parents=True)
    (ckpt / "latest").write_text("step9")
    (ckpt / "step9" / "mp_rank_00_model_states.pt").write_bytes(b"")
    for model, says in [
        (ckpt, f"error: {ckpt}: a training checkpoint, not a Hugging Face folder; convert it first: "
               f"python tools/convert_to_hf.py --checkpoint {ckpt} --out {ckpt.parent / 'hf'}"),
        (tmp_path / "nope", f"error: {tmp_path / 'nope'}: no such folder"),
    ]:  # fmt: skip
        proc = subprocess.run([sys.executable, *tool, "--model", str(model)], input=b"hi\n", cwd=REPO,
                              capture_output=True, timeout=120, env=_env())  # fmt: skip
        assert proc.returncode == 1 and proc.stdout == b"", proc
        assert proc.stderr.decode().splitlines() == [says]


DEMO = REPO / "outputs" / "demo" / "hf"


@pytest.fixture(scope="module")
def demo_engine() -> ChatEngine:
    if not (DEMO / "config.json").is_file():
        pytest.skip(f"{DEMO} not found: `make demo` makes it")
    return ChatEngine.from_pretrained(DEMO, device="cpu")


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_chat_example_answers_as_printed(demo_engine: ChatEngine):
    """The piped example of the README's Chat section, on the demo model, prints what it says."""
    chat = readme_section("## Chat")
    command = next(line for line in chat.splitlines() if line.startswith("printf '"))
    assert command.endswith("| .venv/bin/python inference/bot.py --model outputs/demo/hf --no-sample")
    lines = command.split("'")[1].split("\\n")[:-1]
    out = io.StringIO()
    run_piped(ChatShell(demo_engine, GenerationParams(sample=False), out=out), io.StringIO("\n".join(lines)))
    printed = out.getvalue().splitlines()
    assert printed == ["Nice to meet you, Zoe!", "stone river apple", "Zoe"]
    assert "prints `Nice to meet you, Zoe!`, `stone river apple` and `Zoe`, one per line" in " ".join(
        chat.split()
    )
    for task, answer in [
        ("What is 23 + 19?", "42"),
        ("Reverse the words: tiger music paper", "paper music tiger"),
    ]:
        assert f"(`{task}`: `{answer}`)" in " ".join(chat.split())
        assert demo_engine.reply([Message("user", task)], GenerationParams(sample=False)) == answer
    number = ["Please remember the number 4711.", "What is 3 + 4?", "Which number did I ask you to remember?"]
    shell = ChatShell(demo_engine, GenerationParams(sample=False), out=io.StringIO())
    assert [shell.say(turn) for turn in number][-1] == "4711"


def test_the_interactive_shell_says_what_the_model_can_do(tiny_engine, monkeypatch):
    """chatkit.json's `about` (the recipe's `about`: the demo lists its tasks) is shown at start."""
    import io

    from chatkit.bot import ChatShell, run_interactive
    from chatkit.chat import GenerationParams

    def no_more_input(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_more_input)
    for about in ("adds two numbers", ""):
        out = io.StringIO()
        run_interactive(ChatShell(tiny_engine, GenerationParams(), out=out), about)
        assert ("this model: adds two numbers" in out.getvalue()) == bool(about)
