"""Preference records from a local file or folder in one of the common public layouts.

The layout is detected per row by its keys (data/preference/README.md shows one example of each),
so files in different layouts may be read in one run:

- standard (TRL's "standard" form; UltraFeedback-binarized-like strings): `prompt`, `chosen` and
  `rejected` strings, an optional `system` string. The prompt is one user message.
- conversational (TRL's "conversational" form): `prompt` a list of {role, content} messages (or a
  string: one user message), `chosen` and `rejected` lists holding the one assistant reply. A list
  may instead hold the whole conversation, as UltraFeedback-binarized's do: then it must start with
  the prompt's messages and leave exactly the reply. Without `prompt` (TRL's implicit prompt) the
  chosen conversation without its last message is the prompt.
- ShareGPT (LLaMA-Factory's dpo_en_demo.json): `conversations` turns ({from, value}, speakers as in
  chatkit.datasets.sharegpt), `chosen` and `rejected` turns ({from: gpt, value}), an optional
  `system` string.

A row in none of these layouts, or breaking its own (a missing field, a reply that is not one
assistant message, a whole conversation that does not start with its prompt), stops the run naming
the file, the row and the field: a guess would train on the wrong text. Rows the data itself makes
unusable (an unknown speaker, an empty reply, identical replies) are skipped and counted. There is
no hub repository to download from: --source is required.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatkit.conversation import ROLES, Message, Preference
from chatkit.datasets import sharegpt
from chatkit.datasets.spec import DatasetSpec, Messages, RowError, Skip, assistant, field, system, user

Layout = Callable[[dict[str, Any]], Preference]


def _system(row: dict[str, Any]) -> Messages:
    """The optional `system` string of the standard and ShareGPT layouts, as a leading message."""
    text = field(row, "system", optional=True)
    return [system(text)] if text and text.strip() else []


def standard(row: dict[str, Any]) -> Preference:
    """prompt/chosen/rejected strings: a single-turn record."""
    prompt = (*_system(row), user(field(row, "prompt")))
    return Preference(prompt, assistant(field(row, "chosen")), assistant(field(row, "rejected")))


def _messages(value: list[Any], path: str) -> Messages:
    """{role, content} objects as messages; a speaker outside the schema is the data's, so a Skip."""
    out = []
    for i, m in enumerate(value):
        at = f"field {path!r}[{i}]"
        if not isinstance(m, dict):
            raise RowError(f"{at}: expected a {{role, content}} object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise RowError(f"{at}.role: expected str, got {type(role).__name__}")
        if not isinstance(content, str):
            raise RowError(f"{at}.content: expected str, got {type(content).__name__}")
        if role not in ROLES:
            raise Skip(f"unknown role {role!r}")
        out.append(Message(role, content.strip()))
    return out


def _reply(messages: Messages, prompt: Messages, name: str) -> Message:
    """The one assistant reply in `name`: the list alone, or what follows the prompt's messages."""
    start = 0
    if len(messages) > 1:  # a whole conversation: it must repeat the prompt exactly
        if len(messages) <= len(prompt):
            raise RowError(
                f"field {name!r}: {len(messages)} messages: neither the reply alone nor the "
                f"prompt's {len(prompt)} messages then the reply"
            )
        differ = next((i for i, m in enumerate(prompt) if messages[i] != m), None)
        if differ is not None:
            raise RowError(
                f"field {name!r}[{differ}]: differs from 'prompt'[{differ}] (a whole conversation "
                "must start with the prompt's messages)"
            )
        start = len(prompt)
    if len(messages) - start != 1:
        raise RowError(
            f"field {name!r}: expected one assistant message after the prompt, got {len(messages) - start}"
        )
    if messages[start].role != "assistant":
        raise RowError(
            f"field {name!r}[{start}].role: expected the assistant's reply, got {messages[start].role!r}"
        )
    return messages[start]


def _prompt(raw: str | list[Any] | None, chosen: Messages) -> Messages:
    """A message list, a string (one user message, as UltraFeedback-binarized), or none: TRL's
    implicit prompt, the chosen conversation before its reply."""
    if raw is None:
        return chosen[:-1]
    return [user(raw)] if isinstance(raw, str) else _messages(raw, "prompt")


def conversational(row: dict[str, Any]) -> Preference:
    """prompt messages (or string) and chosen/rejected message lists: one reply or the whole conversation."""
    chosen = _messages(field(row, "chosen", list), "chosen")
    rejected = _messages(field(row, "rejected", list), "rejected")
    prompt = _prompt(field(row, "prompt", (str, list), optional=True), chosen)
    return Preference(tuple(prompt), _reply(chosen, prompt, "chosen"), _reply(rejected, prompt, "rejected"))


def _turn(row: dict[str, Any], name: str) -> Message:
    """A ShareGPT reply turn, {from: gpt, value}; any other speaker breaks the layout."""
    turn = field(row, name, dict)
    speaker, value = turn.get("from"), turn.get("value")
    if not isinstance(value, str):
        raise RowError(f"field {name!r}.value: expected str, got {type(value).__name__}")
    if not isinstance(speaker, str) or sharegpt.ROLES.get(speaker) != "assistant":
        raise RowError(f"field {name!r}.from: expected the assistant's reply (gpt), got {speaker!r}")
    return assistant(value)


def sharegpt_pair(row: dict[str, Any]) -> Preference:
    """conversations turns then chosen/rejected turns, as LLaMA-Factory's preference files."""
    turns = sharegpt.to_conversations(row)[0]
    prompt = turns if turns and turns[0].role == "system" else [*_system(row), *turns]
    return Preference(tuple(prompt), _turn(row, "chosen"), _turn(row, "rejected"))


def layout(row: Any) -> Layout:
    """The layout a row is in, from its keys (and whether its replies are strings or lists)."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if "conversations" in row:
        return sharegpt_pair
    if "prompt" not in row and "chosen" not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(
            "no known preference layout: expected fields prompt/chosen/rejected or "
            f"conversations/chosen/rejected (data/preference/README.md), got {keys}"
        )
    if isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list):
        return conversational
    return standard


def pairs(row: Any) -> list[Preference]:
    return [layout(row)(row)]


SPEC = DatasetSpec(
    name="preference",
    repo=None,
    files=("*.jsonl", "*.json", "*.jsonl.gz", "*.jsonl.zst", "*.parquet"),
    to_conversations=None,
    pairs=pairs,
    description="Preference records (prompt, chosen, rejected) from a local file or folder in a common "
    "public layout, detected per row: prompt/chosen/rejected strings (TRL standard), message lists "
    "(TRL conversational; UltraFeedback-binarized's whole conversations), or ShareGPT "
    "conversations/chosen/rejected turns (LLaMA-Factory).",
)
