"""The interactive shell: OpenChatKit's bot.py, on the shared chat engine.

On a terminal it shows a prompt and streams replies; Ctrl-C stops a reply and keeps what was said,
Ctrl-D (end of input) leaves. When stdin is not a terminal it reads one user turn or command per line,
prints each reply on its own line, and exits 0 at the end of input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from chatkit.chat import (
    ChatEngine,
    ContextProvider,
    GenerationError,
    GenerationParams,
    describe_load_error,
    with_context,
)
from chatkit.conversation import Conversation, ConversationError, Message, iter_jsonl, write_conversations
from chatkit.io import read_meta

HELP = """commands:
  /help             this help
  /quit             leave (Ctrl-D does too)
  /reset            forget the conversation (keeps the system prompt)
  /regen            answer the last user turn again
  /undo             take back the last user turn and its reply
  /system [TEXT]    set the system prompt (without TEXT: show it)
  /set NAME VALUE   change temperature, top_k, top_p, max_tokens or sample (true/false)
  /hyperparameters  show the generation settings
  /raw_prompt       show the exact prompt of the last reply, or of the reply to a turn that awaits one
                    (old turns left out to fit, retrieved passages in, as the model was given them)
  /raw_say TEXT     send TEXT to the model as is (no template, not kept in the conversation)
  /save FILE        write the conversation to FILE (conversation JSONL); never replaces a file
  /save! FILE       the same, replacing FILE if it exists (neither creates folders)
  /load FILE        read a conversation from FILE (the first line of a conversation JSONL)
  /context          show the passages retrieved for the last turn
anything else is sent to the model as your next turn; Ctrl-C stops a reply and keeps what was said.
When the conversation outgrows the model's context, the oldest whole turns are left out of the prompt
(never the system prompt), and a line says how many."""

EMPTY_REPLY = "(empty reply)"
"""Printed in place of a reply that has no text, so that it cannot pass for a missing one."""

# /set NAME -> (GenerationParams field, parser, check, what a good value is)
_BOOLS = {
    "true": True,
    "on": True,
    "1": True,
    "yes": True,
    "false": False,
    "off": False,
    "0": False,
    "no": False,
}
SETTINGS: dict[str, tuple[str, Callable[[str], object], Callable[[object], bool], str]] = {
    "temperature": ("temperature", float, lambda v: v >= 0, "a number >= 0"),
    "top_k": ("top_k", int, lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "top_p": ("top_p", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_tokens": ("max_new_tokens", int, lambda v: v >= 1, "an integer >= 1"),
    "sample": ("sample", lambda s: _BOOLS[s.lower()], lambda v: True, "true or false"),
}


class ChatShell:
    """The conversation plus the commands that act on it; `out` receives everything it prints.

    `context_provider` is retrieval's hook: called with the conversation (ending with the new user
    turn) before each reply, its passages are added to the system prompt of that turn's prompt only
    (see `chatkit.chat.with_context`); the history keeps the plain turns. `/context` shows them.
    """

    def __init__(
        self,
        engine: ChatEngine,
        params: GenerationParams,
        system: str | None = None,
        stream: bool = True,
        out: TextIO = sys.stdout,
        seed: int | None = None,
        context_provider: ContextProvider | None = None,
    ):
        self.engine, self.params, self.stream, self.out, self.seed = engine, params, stream, out, seed
        self.system = system
        self.context_provider = context_provider
        self.last_context: list[str] | None = None
        self.history: list[Message] = []
        self._answered: tuple[list[Message], list[Message], int] | None = None
        """(the history after the last reply, the messages its prompt held, how many were left out)."""
        self.reset()
        self.commands: dict[str, Callable[[str], bool]] = {
            "/help": self._help,
            "/quit": lambda _: False,
            "/reset": self._reset,
            "/regen": self._regen,
            "/undo": self._undo,
            "/system": self._system,
            "/set": self._set,
            "/hyperparameters": self._hyperparameters,
            "/raw_prompt": self._raw_prompt,
            "/raw_say": self._raw_say,
            "/save": self._save,
            "/save!": lambda arg: self._save(arg, replace=True),
            "/load": self._load,
            "/context": self._context,
        }

    def reset(self) -> None:
        self.history = [Message("system", self.system)] if self.system else []
        self.last_context = None

    def handle(self, line: str) -> bool:
        """Act on one input line; False means the user asked to quit."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            name, _, arg = line.partition(" ")
            cmd = self.commands.get(name)
            if cmd is None:
                self._print(f"unknown command {name}; /help lists them")
                return True
            return cmd(arg.strip())
        self.say(line)
        return True

    def say(self, text: str) -> str:
        """Send a user turn, print the reply (streamed or whole), keep both in the history."""
        self.history.append(Message("user", text))
        return self._respond()

    def _respond(self) -> str:
        """Answer the conversation, which ends with a user turn; the reply joins the history."""
        messages = self.history
        if self.context_provider is not None:
            self.last_context = list(self.context_provider(list(self.history)) or [])
            messages = with_context(self.history, self.last_context)
            if note := getattr(self.context_provider, "note", None):  # e.g. passages cut to fit
                self._print(note)
        try:
            kept = self.engine.prompt_messages(messages, self.params.max_new_tokens)
            left_out = len(messages) - len(kept)
            self._left_out(left_out)
            reply = self._emit(self.engine.stream(messages, self.params, self.seed))
        except (ValueError, GenerationError) as e:  # e.g. a turn longer than the context
            self.history.pop()
            self._print(f"error: {e}")
            return ""
        except KeyboardInterrupt:  # Ctrl-C before the first piece (while the prompt is encoded)
            self.history.pop()
            self._print("(stopped before the reply began)")
            return ""
        self._show_tool_calls(reply)
        self.history.append(Message("assistant", reply))
        self._answered = (list(self.history), kept, left_out)
        return reply

    def _show_tool_calls(self, reply: str) -> None:
        """A line per tool call the reply makes, in the template's markup (the shell runs no tools: the
        call stays in the history as the model wrote it)."""
        for call in self.engine.template.parse_reply(reply).tool_calls:
            self._print(f"[tool call] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})")

    def _emit(self, pieces_iter) -> str:
        """Print a stream of pieces (or the whole text at the end); Ctrl-C stops it, keeping the text."""
        pieces: list[str] = []
        try:
            for piece in pieces_iter:
                pieces.append(piece)
                if self.stream:
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            pass  # Ctrl-C stops the reply; what was said so far is kept
        text = "".join(pieces)
        if not text.strip():
            self.out.write(EMPTY_REPLY + "\n")
        else:
            self.out.write(("" if self.stream else text) + "\n")
        self.out.flush()
        return text

    def _left_out(self, n: int) -> None:
        """Say that the prompt leaves out the n oldest messages (the engine trims them to fit)."""
        if n > 0:
            self._print(f"({n} earlier message{'s' if n != 1 else ''} left out to fit the context)")

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _help(self, _: str) -> bool:
        self._print(HELP)
        return True

    def _reset(self, _: str) -> bool:
        self.reset()
        self._print("(conversation reset)")
        return True

    def _regen(self, _: str) -> bool:
        if self.history and self.history[-1].role == "assistant":
            self.history.pop()
        if not self.history or self.history[-1].role != "user":
            self._print("(nothing to regenerate)")
            return True
        self._respond()
        return True

    def _undo(self, _: str) -> bool:
        last_user = max((i for i, m in enumerate(self.history) if m.role == "user"), default=None)
        if last_user is None:
            self._print("(nothing to undo)")
            return True
        self.history = self.history[:last_user]
        self._print("(took back the last turn)")
        return True

    def _system(self, text: str) -> bool:
        if not text:
            self._print(self.system if self.system else "(no system prompt)")
            return True
        self.system = text
        rest = self.history[1:] if self.history and self.history[0].role == "system" else self.history
        self.history = [Message("system", text), *rest]
        self._print("(system prompt set)")
        return True

    def _set(self, arg: str) -> bool:
        name, _, value = arg.partition(" ")
        value = value.strip()
        if name not in SETTINGS or not value:
            self._print(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
            return True
        field, parse, ok, want = SETTINGS[name]
        try:
            parsed = parse(value)
        except (ValueError, KeyError):
            parsed = None
        if parsed is None or not ok(parsed):
            self._print(f"bad value for {name}: {value!r} (want {want})")
            return True
        setattr(self.params, field, parsed)
        self._print(f"{field}: {parsed}")
        return True

    def _hyperparameters(self, _: str) -> bool:
        for k, v in self.params.as_dict().items():
            self._print(f"{k}: {v}")
        return True

    def _raw_prompt(self, _: str) -> bool:
        """/raw_prompt: the prompt as the model is given it, never text it is not (a `<bot>:` after a
        reply). While the history is as the last reply left it, that reply's prompt as recorded
        (retrieved passages in); else the prompt for the last user turn, fitted now."""
        if self._answered is not None and self._answered[0] == self.history:
            _, kept, left_out = self._answered
        else:
            asked = self._up_to_last_user_turn()
            if asked is None:
                self._print("(no prompt yet: the first one is made when you send a message)")
                return True
            try:
                kept = self.engine.prompt_messages(asked, self.params.max_new_tokens)
            except ValueError as e:
                self._print(f"error: {e}")
                return True
            left_out = len(asked) - len(kept)
        self._left_out(left_out)
        self._print(self.engine.raw_prompt(kept))
        return True

    def _up_to_last_user_turn(self) -> list[Message] | None:
        """The history up to its last user turn (what a reply answers); None without one."""
        last = max((i for i, m in enumerate(self.history) if m.role == "user"), default=None)
        return None if last is None else self.history[: last + 1]

    def _raw_say(self, text: str) -> bool:
        if not text:
            self._print("usage: /raw_say TEXT")
            return True
        try:
            self._emit(self.engine.complete(text, self.params, self.seed))
        except (ValueError, GenerationError) as e:
            self._print(f"error: {e}")
        return True

    def _save(self, arg: str, replace: bool = False) -> bool:
        """/save FILE refuses to replace a file (/save! FILE does); neither creates a missing folder."""
        if not arg:
            self._print(f"usage: /save{'!' if replace else ''} FILE")
            return True
        path = Path(arg).expanduser()
        folder = path.parent
        if path.is_dir():
            self._print(f"error: {arg} is a folder; name a file")
            return True
        if not folder.is_dir():
            why = "is not a folder" if folder.exists() else "does not exist (/save does not create folders)"
            self._print(f"error: cannot write {arg}: {folder} {why}")
            return True
        existed = path.exists() or path.is_symlink()
        if existed and not replace:
            self._print(f"error: {arg} exists; /save! {arg} replaces it")
            return True
        try:
            write_conversations(path, [Conversation(tuple(self.history), source="chatkit.bot")])
        except OSError as e:
            self._print(f"error: cannot write {arg}: {e.strerror or e}")
            return True
        self._print(f"(saved {len(self.history)} messages to {arg}{', replacing it' if existed else ''})")
        return True

    def _load(self, arg: str) -> bool:
        if not arg:
            self._print("usage: /load FILE")
            return True
        try:
            conv = first_conversation(Path(arg).expanduser())
        except OSError as e:
            self._print(f"error: cannot load {arg}: {e.strerror or e}")
            return True
        except ConversationError as e:  # the message starts with file:line
            self._print(f"error: cannot load {e}")
            return True
        if conv is None:
            self._print(f"error: {arg} holds no conversation")
            return True
        self.history = [Message(m.role, m.content) for m in conv.messages]
        self.system = self.history[0].content if self.history[0].role == "system" else None
        self.last_context = None
        self._print(f"(loaded {len(self.history)} messages from {arg})")
        return True

    def _context(self, _: str) -> bool:
        if self.context_provider is None:
            self._print("(no retrieval)")
        elif self.last_context is None:
            self._print("(nothing retrieved yet)")
        elif callable(describe := getattr(self.context_provider, "describe", None)):
            self._print(describe())  # retrieval's own account: score, rows, source and text
        elif not self.last_context:
            self._print("(nothing retrieved for the last turn)")
        else:
            for i, passage in enumerate(self.last_context, 1):
                self._print(f"[{i}] {passage}")
        return True


def first_conversation(path: Path) -> Conversation | None:
    """The first conversation of a conversation JSONL file (None if it has none), read line by line.

    Every problem is a ConversationError naming the file and line: a byte that is not UTF-8, invalid
    JSON, JSON nested too deeply, or a conversation that breaks the schema."""
    return next(iter_jsonl(path), None)


def run_interactive(shell: ChatShell, about: str = "") -> None:
    """`about`: what the model can do, as its training recipe says (chatkit.json's `about`)."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    shell._print("chatkit bot: type a message, /help for commands, /quit to leave.")
    if about:
        shell._print(f"this model: {about}")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            shell._print("")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line being typed
            shell._print("")
            continue
        if not shell.handle(line):
            return


def run_piped(shell: ChatShell, stdin: TextIO) -> None:
    """One line per turn or command until /quit or the end of input (never reads past it)."""
    try:
        for line in stdin:
            if not shell.handle(line.rstrip("\n")):
                return
    except KeyboardInterrupt:  # Ctrl-C between replies ends piped input
        return


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Chat with a model in the terminal. Piped stdin: one user turn or command per line.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Hugging Face folder (e.g. outputs/demo/hf)")
    p.add_argument("--template", help="chat template (default: the one recorded in the model folder)")
    add_generation_args(p)
    p.add_argument("--no-stream", action="store_true", help="print each reply whole")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--seed", type=int, help="seed for sampling")
    add_retrieval_args(p)
    add_loading_args(p)
    return p


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags, defaulting to `GenerationParams`' fields: the bot, the server's API and its
    page (which leaves unset fields to the server) share that one set of defaults."""
    d = GenerationParams()
    p.add_argument("--max-tokens", type=int, default=d.max_new_tokens,
                   help=f"most tokens per reply ({d.max_new_tokens})")  # fmt: skip
    p.add_argument(
        "--sample", action=argparse.BooleanOptionalAction, default=d.sample, help="sample or greedy"
    )
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature ({d.temperature})")  # fmt: skip
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"sample from the k likeliest tokens ({d.top_k}; 0: off)")  # fmt: skip
    p.add_argument(
        "--top-p", type=float, default=d.top_p, help=f"nucleus sampling threshold ({d.top_p}: off)"
    )


def add_loading_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto)")
    p.add_argument("--gpu-id", type=int, default=0, help="which GPU, for --device cuda/auto (0)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (bf16 on GPU, else fp32)")
    p.add_argument("--gpu-vram", type=float, help="GiB of the GPU to use; with --cpu-ram, spreads the model")
    p.add_argument(
        "--cpu-ram", type=float, help="GiB of CPU memory to use for layers that do not fit the GPU"
    )
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true", help="quantize weights to 8 bits (bitsandbytes)")
    q.add_argument("--load-in-4bit", action="store_true", help="quantize weights to 4-bit NF4 (bitsandbytes)")


def engine_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> ChatEngine:
    """Load the engine as the loading flags say; a bad flag or model folder exits with a message."""
    if (args.gpu_vram is None) != (args.cpu_ram is None):
        p.error("--gpu-vram and --cpu-ram go together (as in OpenChatKit); 0 leaves a device out")
    max_memory = None
    if args.gpu_vram is not None:
        max_memory = {}
        if args.gpu_vram > 0:
            max_memory[args.gpu_id] = f"{args.gpu_vram}GiB"
        if args.cpu_ram > 0:
            max_memory["cpu"] = f"{args.cpu_ram}GiB"
        if not max_memory:
            p.error("--gpu-vram and --cpu-ram are both 0: nowhere to put the model")
    device = f"cuda:{args.gpu_id}" if args.device == "cuda" else args.device
    if device == "auto":
        import torch

        device = f"cuda:{args.gpu_id}" if torch.cuda.is_available() else "cpu"
    quantize = "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None
    try:
        return ChatEngine.from_pretrained(args.model, args.template, device, args.dtype, max_memory, quantize)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(describe_load_error(args.model, e))


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    return GenerationParams(args.max_tokens, args.sample, args.temperature, args.top_k, args.top_p)


WIKIPEDIA_INDEX = "data/wikipedia-3sentence-level-retrieval-index/files"


def add_retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--retrieval", action="store_true", help="add passages retrieved from --index to each turn"
    )
    p.add_argument("--index", default=WIKIPEDIA_INDEX, help=f"retrieval index folder ({WIKIPEDIA_INDEX})")
    p.add_argument("--retrieval-k", type=int, default=1, help="passages per turn (1, as OpenChatKit)")


def retrieval_from_args(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    engine: ChatEngine | None = None,
    params: GenerationParams | None = None,
):
    """--retrieval: passages from a Faiss index go into each turn's prompt (OpenChatKit's bot did this),
    fitted to `engine`'s context with room for a reply of `params.max_new_tokens` (read at each turn,
    so /set max_tokens counts)."""
    if not args.retrieval:
        return None
    from chatkit.retrieval.context import Retriever, context_provider
    from chatkit.retrieval.passages import RetrievalError

    try:
        return context_provider(
            Retriever.from_dir(args.index), args.retrieval_k, engine=engine, params=params
        )
    except (RetrievalError, FileNotFoundError, ValueError) as e:
        p.error(f"--retrieval: {e}")


def take_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt here, whatever this process inherited.

    Python leaves SIGINT alone when it starts ignored, which a shell does for commands it starts in
    the background (`cmd &` in a script, CI runners, some IDE consoles); Ctrl-C would then neither stop
    a reply nor clear the prompt, the two things the shell promises it does.
    """
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    take_ctrl_c()
    engine = engine_from_args(p, args)
    params = params_from_args(args)
    provider = retrieval_from_args(p, args, engine, params)
    shell = ChatShell(
        engine, params, args.system, stream=not args.no_stream, seed=args.seed, context_provider=provider,
    )  # fmt: skip
    if sys.stdin.isatty():
        run_interactive(shell, str(read_meta(args.model).get("about", "")))
    else:
        run_piped(shell, sys.stdin)
