"""The conversation format every dataset is turned into, and its validation.

One conversation per JSONL line::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "train": true|false}],
     "source": "..."}

`train` is optional; by default only assistant messages are trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatkit.io import write_jsonl

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A conversation that breaks the schema; the message names file, line and field."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool | None = None
    """Overrides the default (loss on assistant messages only) when set."""

    @property
    def trained(self) -> bool:
        return self.train if self.train is not None else self.role == "assistant"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.train is not None:
            d["train"] = self.train
        return d


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages], "source": self.source, **self.extra}


def parse_conversation(obj: Any, where: str = "<input>") -> Conversation:
    """Validate one decoded JSON object; `where` (e.g. ``train.jsonl:12``) prefixes every error."""
    if not isinstance(obj, dict):
        raise ConversationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ConversationError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise ConversationError(f"{at}: expected an object, got {type(m).__name__}")
        role, content, train = m.get("role"), m.get("content"), m.get("train")
        if role not in ROLES:
            raise ConversationError(f"{at}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ConversationError(f"{at}.content: must be a string, got {type(content).__name__}")
        if train is not None and not isinstance(train, bool):
            raise ConversationError(f"{at}.train: must be true or false, got {train!r}")
        unknown = set(m) - {"role", "content", "train"}
        if unknown:
            raise ConversationError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
        if role == "system" and i != 0:
            raise ConversationError(f"{at}.role: a system message may only come first")
        out.append(Message(role, content, train))
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise ConversationError(f"{where}: field 'source' must be a string")
    extra = {k: v for k, v in obj.items() if k not in ("messages", "source")}
    return Conversation(tuple(out), source, extra)


def parse_line(line: str, where: str) -> Conversation:
    """One JSONL line -> a validated conversation; errors start with `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConversationError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ConversationError(f"{where}: JSON nested too deeply to read") from None
    return parse_conversation(obj, where)


def decode_line(raw: bytes, where: str, first: bool = False) -> str:
    """A line of a JSONL file as text; a byte that is not UTF-8 is an error naming `where` and its
    column. The first line may start with a byte-order mark (Windows editors write one)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ConversationError(
            f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        ) from None


def iter_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Yield validated conversations, reading line by line; stop at the first bad line with its file
    and line number (bad bytes, bad JSON or a broken schema)."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, f"{path}:{lineno}", lineno == 1)
            if line.strip():
                yield parse_line(line, f"{path}:{lineno}")


def read_jsonl(path: str | Path) -> list[Conversation]:
    return list(iter_jsonl(path))


def write_conversations(path: str | Path, conversations: list[Conversation]) -> int:
    return write_jsonl(path, (c.to_dict() for c in conversations))
