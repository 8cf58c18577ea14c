"""The conversation format every dataset is turned into, and its validation.

One conversation per JSONL line::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "train": true|false}],
     "source": "..."}

`train` is optional; by default only assistant messages are trained.

A preference record (DPO and its relatives) is a conversation prefix ending with a user message and
two candidate replies to it, the preferred one and the other::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., {"role": "user", ...}],
     "chosen": {"role": "assistant", "content": "..."},
     "rejected": {"role": "assistant", "content": "..."},
     "source": "..."}

Only the replies are scored (their tokens and the end of turn), so the prefix carries no `train`.
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


def parse_conversation(obj: Any, where: str = "<input>", preference: bool = False) -> Conversation:
    """Validate one decoded JSON object; `where` (e.g. ``train.jsonl:12``) prefixes every error."""
    if not isinstance(obj, dict):
        raise ConversationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    msgs = obj.get("messages")
    if "chosen" in obj and "rejected" in obj and not preference:
        raise ConversationError(
            f"{where}: a preference record (fields 'chosen' and 'rejected'), not a conversation: "
            "train preference pairs with method=dpo"
        )
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


@dataclass(frozen=True)
class Preference:
    """A prompt (the conversation so far, ending with a user message) and two replies to it."""

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def sequences(self) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
        """The two conversations that are scored: the prompt (never trained) and each reply (trained)."""
        prompt = tuple(Message(m.role, m.content, False) for m in self.prompt)
        return prompt + (Message("assistant", self.chosen.content, True),), prompt + (
            Message("assistant", self.rejected.content, True),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": [m.to_dict() for m in self.prompt],
            "chosen": self.chosen.to_dict(),
            "rejected": self.rejected.to_dict(),
            "source": self.source,
            **self.extra,
        }


def _reply(obj: Any, at: str) -> Message:
    if not isinstance(obj, dict):
        raise ConversationError(f"{at}: expected an object with 'content', got {type(obj).__name__}")
    unknown = set(obj) - {"role", "content"}
    if unknown:
        raise ConversationError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
    role, content = obj.get("role", "assistant"), obj.get("content")
    if role != "assistant":
        raise ConversationError(f"{at}.role: a reply must be an assistant message, got {role!r}")
    if not isinstance(content, str):
        raise ConversationError(f"{at}.content: must be a string, got {type(content).__name__}")
    return Message("assistant", content)


def parse_preference(obj: Any, where: str = "<input>") -> Preference:
    """Validate one decoded preference record; every error starts with `where` and names the field."""
    if not isinstance(obj, dict):
        raise ConversationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            hint = "" if {"chosen", "rejected"} & set(obj) else "; a conversation file trains with method=sft"
            raise ConversationError(
                f"{where}: field {key!r} is missing (a preference record needs both replies{hint})"
            )
    conv = parse_conversation({k: v for k, v in obj.items() if k not in ("chosen", "rejected")}, where, True)
    for i, m in enumerate(conv.messages):
        if m.train is not None:
            raise ConversationError(
                f"{where}: messages[{i}].train: not allowed in a preference record (only the replies are scored)"
            )
    if conv.messages[-1].role != "user":
        raise ConversationError(
            f"{where}: messages[{len(conv.messages) - 1}].role: the prompt must end with a user message "
            f"(the replies answer it), got {conv.messages[-1].role!r}"
        )
    chosen, rejected = (
        _reply(obj["chosen"], f"{where}: chosen"),
        _reply(obj["rejected"], f"{where}: rejected"),
    )
    return Preference(conv.messages, chosen, rejected, conv.source, conv.extra)


def _load_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ConversationError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ConversationError(f"{where}: JSON nested too deeply to read") from None


def parse_line(line: str, where: str) -> Conversation:
    """One JSONL line -> a validated conversation; errors start with `where` (file:line)."""
    return parse_conversation(_load_line(line, where), where)


def parse_preference_line(line: str, where: str) -> Preference:
    """One JSONL line -> a validated preference record; errors start with `where` (file:line)."""
    return parse_preference(_load_line(line, where), where)


def decode_line(raw: bytes, where: str, first: bool = False) -> str:
    """A line of a JSONL file as text; a byte that is not UTF-8 is an error naming `where` and its
    column. The first line may start with a byte-order mark (Windows editors write one)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ConversationError(
            f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        ) from None


def _text_lines(path: str | Path) -> Iterator[tuple[str, str]]:
    """(line, "file:line") for every non-blank line, decoded as UTF-8 (a bad byte is an error naming
    its file, line and column)."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, f"{path}:{lineno}", lineno == 1)
            if line.strip():
                yield line, f"{path}:{lineno}"


def iter_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Yield validated conversations, reading line by line; stop at the first bad line with its file
    and line number (bad bytes, bad JSON or a broken schema)."""
    for line, where in _text_lines(path):
        yield parse_line(line, where)


def iter_preferences(path: str | Path) -> Iterator[Preference]:
    """Yield validated preference records line by line; stop at the first bad one (file:line, field)."""
    for line, where in _text_lines(path):
        yield parse_preference_line(line, where)


def read_jsonl(path: str | Path) -> list[Conversation]:
    return list(iter_jsonl(path))


def write_conversations(path: str | Path, conversations: list[Conversation]) -> int:
    return write_jsonl(path, (c.to_dict() for c in conversations))
