"""ShareGPT: conversations users shared from ChatGPT, as Vicuna (and Koala, from its own scrape) used.

Upstream anon8231489123/ShareGPT_Vicuna_unfiltered: `ShareGPT_V3_unfiltered_cleaned_split.json`, a
JSON list of `{"id", "conversations": [{"from", "value"}, ...]}`. Every turn is kept, mapped by
`from`: human and user -> user; gpt, chatgpt and bing -> assistant; system -> system (first turn
only). A conversation with any other speaker, a system turn after the first, or an empty turn is
skipped with that reason; so is one that does not end with an assistant turn (unanswered
questions are not trimmed, so nothing is dropped unseen).
"""

from __future__ import annotations

from chatkit.conversation import Message
from chatkit.datasets.spec import DatasetSpec, Messages, RowError, Skip, field

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
}


def to_conversations(row: dict) -> list[Messages]:
    turns = field(row, "conversations", list)  # RowError for a row that is not an object, too
    messages = []
    for i, turn in enumerate(turns):
        speaker, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if not isinstance(value, str):
            raise RowError(f"field 'conversations'[{i}].value: expected str, got {type(value).__name__}")
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise Skip(f"unknown role {speaker!r}")
        if role == "system" and i > 0:
            raise Skip("system turn after the first")
        messages.append(Message(role, value.strip()))
    return [messages]


SPEC = DatasetSpec(
    name="sharegpt",
    repo="anon8231489123/ShareGPT_Vicuna_unfiltered",
    files=("ShareGPT_V3_unfiltered_cleaned_split.json",),
    to_conversations=to_conversations,
    description="ShareGPT conversations (Vicuna's cleaned split): every human/gpt/system turn "
    "becomes a user/assistant/system message; unknown speakers and empty turns are skipped.",
)
