"""The interactive shell: OpenChatKit's bot.py, on the shared chat engine.

On a terminal it shows a prompt and streams replies. When stdin is not a terminal it reads one user
turn per line, prints each reply on its own line, and exits 0 at the end of input.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Message

HELP = """commands:
  /help             this help
  /quit             leave (Ctrl-D does too)
  /reset            forget the conversation (keeps the system prompt)
  /raw_prompt       show the exact prompt the model sees for the next reply
  /hyperparameters  show the generation settings
anything else is sent to the model as your next turn."""


class ChatShell:
    def __init__(
        self,
        engine: ChatEngine,
        params: GenerationParams,
        system: str | None = None,
        stream: bool = True,
        out: TextIO = sys.stdout,
        seed: int | None = None,
    ):
        self.engine, self.params, self.stream, self.out, self.seed = engine, params, stream, out, seed
        self.system = system
        self.history: list[Message] = []
        self.reset()
        self.commands: dict[str, Callable[[str], bool]] = {
            "/help": self._help,
            "/quit": lambda _: False,
            "/reset": self._reset,
            "/raw_prompt": self._raw_prompt,
            "/hyperparameters": self._hyperparameters,
        }

    def reset(self) -> None:
        self.history = [Message("system", self.system)] if self.system else []

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
            return cmd(arg)
        self.say(line)
        return True

    def say(self, text: str) -> str:
        """Send a user turn, print the reply (streamed or whole), keep both in the history."""
        self.history.append(Message("user", text))
        pieces: list[str] = []
        try:
            for piece in self.engine.stream(self.history, self.params, self.seed):
                pieces.append(piece)
                if self.stream:
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            pass  # Ctrl-C stops the reply; what was said so far is kept
        reply = "".join(pieces)
        self.out.write(("" if self.stream else reply) + "\n")
        self.out.flush()
        self.history.append(Message("assistant", reply))
        return reply

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

    def _raw_prompt(self, _: str) -> bool:
        self._print(self.engine.raw_prompt(self.history))
        return True

    def _hyperparameters(self, _: str) -> bool:
        for k, v in self.params.as_dict().items():
            self._print(f"{k}: {v}")
        return True


def run_interactive(shell: ChatShell) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    shell._print("chatkit bot: type a message, /help for commands, /quit to leave.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            shell._print("")
            return
        except KeyboardInterrupt:
            shell._print("")
            continue
        if not shell.handle(line):
            return


def run_piped(shell: ChatShell, stdin: TextIO) -> None:
    for line in stdin:
        if not shell.handle(line.rstrip("\n")):
            return


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Chat with a model in the terminal. Piped stdin: one user turn per line.",
    )
    p.add_argument("--model", required=True, help="Hugging Face folder (e.g. outputs/demo/hf)")
    p.add_argument("--template", help="chat template (default: the one recorded in the model folder)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per reply (default 128)")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=True, help="sample or greedy")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-stream", action="store_true", help="print each reply whole")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    engine = ChatEngine.from_pretrained(args.model, args.template, args.device)
    params = GenerationParams(args.max_tokens, args.sample, args.temperature, args.top_k, args.top_p)
    shell = ChatShell(engine, params, args.system, stream=not args.no_stream, seed=args.seed)
    if sys.stdin.isatty():
        run_interactive(shell)
    else:
        run_piped(shell, sys.stdin)
