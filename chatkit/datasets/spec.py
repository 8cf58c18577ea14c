"""What a dataset module declares (a `DatasetSpec`) and the small helpers its row mapping uses.

A dataset module only maps one upstream row to conversations (lists of `Message`) and, for
preference sets, to preference records (`Preference`: a prompt and a chosen and a rejected reply);
reading the upstream files, validation, splitting, writing and counting live in
`chatkit.datasets.prepare`.
A mapping raises `Skip` to drop a row with a counted reason, and `RowError` when the row breaks
the upstream's own format (the run stops and names the file, the row and the field).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatkit.conversation import Conversation, Message, Preference

Messages = list[Message]
RowMapper = Callable[[Any], "list[Messages] | list[Conversation]"]
"""One upstream row -> its conversations: message lists, or `Conversation`s where they carry tools."""
PairMapper = Callable[[Any], list[Preference]]

UNHELPFUL_MARKER = "An Unhelpful Answer:"
"""Koala's negative preference marker. Koala conditioned the model on "a helpful answer" / "an
unhelpful answer" markers; Chain of Hindsight (same authors, public code) puts such a marker as an
untrained prefix right before the answer. Our schema trains whole messages, so the marker ends the
last user message (never trained, directly before the reply) and the rejected reply is the trained
assistant message. See `mark_unhelpful`."""


class Skip(Exception):
    """Raised by a row mapping to skip the row; `reason` is what the summary counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RowError(ValueError):
    """A row that breaks the upstream's format; the message names the field and what is wrong."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    """Folder under data/ and the `source` written with every conversation."""
    repo: str | None
    """Hugging Face dataset repository the source is downloaded from; None: only a local --source."""
    files: tuple[str, ...]
    """Globs (relative to the repository root) of the upstream files to download and read."""
    to_conversations: RowMapper | None
    """Maps one upstream row to 0..n conversations; raises `Skip` or `RowError`. None: `pairs` only."""
    description: str
    """One paragraph for --help: what the upstream is and what the mapping does."""
    revision: str | None = None
    """Repository revision to download (e.g. the hub's parquet conversion branch)."""
    rejected: RowMapper | None = None
    """Preference sets: maps a row to its rejected-answer conversations; enables --keep-rejected."""
    pairs: PairMapper | None = None
    """Preference sets: maps a row to 0..n preference records (the source is filled in); enables
    --pairs, or is the only output when `to_conversations` is None."""
    val_fraction: float = 0.01
    """Default share of rows held out in val.jsonl."""
    other_files: tuple[str, ...] = ()
    """Globs of the upstream's files as published elsewhere (another release, another layout), read
    from a --source folder in which `files`, in any readable format, match nothing."""
    recipe_folders: Callable[[str], tuple[str, ...] | None] | None = None
    """Sets a recipe reads one folder per upstream file (OIG): maps the folder name in a recipe's
    `data/<name>/files/<folder>/train.jsonl` to the upstream globs it holds, or None when it cannot
    tell; enables `prepare.py --recipe`."""

    def __post_init__(self) -> None:
        if self.to_conversations is None and self.pairs is None:
            raise ValueError(f"dataset {self.name!r}: needs to_conversations, pairs or both")
        if self.rejected is not None and self.to_conversations is None:
            raise ValueError(f"dataset {self.name!r}: rejected conversations need to_conversations")


# --- helpers for row mappings ---------------------------------------------------------------------


def user(text: str) -> Message:
    return Message("user", text.strip())


def assistant(text: str) -> Message:
    return Message("assistant", text.strip())


def system(text: str) -> Message:
    return Message("system", text.strip())


def field(row: dict[str, Any], path: str, kind: type | tuple[type, ...] = str, optional: bool = False) -> Any:
    """`row["a"]["b"]` for path "a.b", checked against `kind`; RowError names the field otherwise.

    With `optional`, a missing or null value gives None instead of an error.
    """
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    value: Any = row
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            if optional:
                return None
            raise RowError(f"field {path!r}: missing")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RowError(f"field {path!r}: expected {names}, got {type(value).__name__}")
    return value


def string_list(row: dict[str, Any], path: str) -> list[str]:
    items = field(row, path, list)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise RowError(f"field {path!r}[{i}]: expected str, got {type(item).__name__}")
    return items


def with_input(instruction: str, context: str) -> str:
    """Alpaca's instruction-with-input as one user message; the `alpaca` template renders it."""
    instruction, context = instruction.strip(), context.strip()
    return f"{instruction}\n\n### Input:\n{context}" if context else instruction


def split_turns(text: str, pattern: re.Pattern[str], roles: dict[str, str]) -> tuple[str, Messages]:
    """Split text on speaker markers; `pattern` captures the speaker, `roles` maps it to a role.

    Returns the text before the first marker (stripped) and one message per marker.
    """
    parts = pattern.split(text)
    preamble, rest = parts[0].strip(), parts[1:]
    messages = [
        Message(roles[speaker], content.strip())
        for speaker, content in zip(rest[::2], rest[1::2], strict=True)
    ]
    return preamble, messages


def mark_unhelpful(messages: Messages) -> Messages:
    """The rejected-answer form of a conversation: `UNHELPFUL_MARKER` ends the last user message.

    Raises Skip (the same reasons the library gives) when there is no user turn or no final reply.
    """
    *context, reply = messages
    last_user = max((i for i, m in enumerate(context) if m.role == "user"), default=None)
    if reply.role != "assistant":
        raise Skip("does not end with an assistant message")
    if last_user is None:
        raise Skip("no user message")
    marked = Message("user", f"{context[last_user].content}\n\n{UNHELPFUL_MARKER}")
    return [*context[:last_user], marked, *context[last_user + 1 :], reply]


def preference_mappers(pair: Callable[[Any], tuple[str, str, str]]) -> tuple[RowMapper, RowMapper]:
    """(to_conversations, rejected) for single-turn comparison rows, as Koala used them.

    `pair(row)` returns (prompt, preferred answer, other answer); the preferred answer is the reply,
    and the other one, with --keep-rejected, becomes its own conversation under the unhelpful marker.
    """

    def to_conversations(row: Any) -> list[Messages]:
        prompt, preferred, _ = pair(row)
        return [[user(prompt), assistant(preferred)]]

    def rejected(row: Any) -> list[Messages]:
        prompt, _, other = pair(row)
        return [mark_unhelpful([user(prompt), assistant(other)])]

    return to_conversations, rejected


def preference_pairs(pair: Callable[[Any], tuple[str, str, str]]) -> PairMapper:
    """The --pairs mapping for the same single-turn comparison rows as `preference_mappers`.

    One record per row: the prompt as the only user message, the preferred and the other answer as
    the chosen and the rejected reply, with no marker (a preference loss compares them itself).
    """

    def pairs(row: Any) -> list[Preference]:
        prompt, preferred, other = pair(row)
        return [Preference((user(prompt),), assistant(preferred), assistant(other))]

    return pairs
