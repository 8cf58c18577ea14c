"""Anthropic HH-RLHF: helpfulness and harmlessness preference pairs, as Koala trained on them.

Upstream Anthropic/hh-rlhf: `harmless-base/`, `helpful-base/`, `helpful-online/` and
`helpful-rejection-sampled/`, each a `train.jsonl.gz` (160,800 rows together; the test files are
left out, we hold out our own val) of `{"chosen", "rejected"}`, two transcripts that share their
start and differ in the last reply. A transcript is `\\n\\nHuman: ...\\n\\nAssistant: ...` turns;
every turn is kept. Following Koala the chosen transcript is the conversation, its last assistant
turn the reply. With --keep-rejected the rejected transcript is written too, its last user
message ending with Koala's marker "An Unhelpful Answer:" (see `spec.UNHELPFUL_MARKER`); a
rejected reply identical to the chosen one is skipped with that reason.

With --pairs each row is one preference record instead: the prompt is the chosen transcript without
its last assistant turn (earlier turns kept whole), the chosen and rejected replies are the two
transcripts' last turns. A row whose transcripts differ before the last reply is skipped, counted,
rather than trusted (one of them would be answering another conversation); so is one whose two
replies are identical (nothing to prefer).
"""

from __future__ import annotations

import re

from chatkit.conversation import Preference
from chatkit.datasets.spec import DatasetSpec, Messages, Skip, field, mark_unhelpful, split_turns

TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]*")
ROLES = {"Human": "user", "Assistant": "assistant"}


def transcript(text: str) -> Messages:
    preamble, messages = split_turns(text, TURN, ROLES)
    if preamble:
        raise Skip("text before the first Human: turn")
    return messages


def to_conversations(row: dict) -> list[Messages]:
    return [transcript(field(row, "chosen"))]


def rejected(row: dict) -> list[Messages]:
    chosen, other = transcript(field(row, "chosen")), transcript(field(row, "rejected"))
    if other and chosen and other[-1].role == "assistant" and other[-1] == chosen[-1]:
        raise Skip("rejected reply identical to the chosen one")
    return [mark_unhelpful(other)] if other else [[]]


def pairs(row: dict) -> list[Preference]:
    """One record: the shared start of the two transcripts, then their two last replies."""
    chosen, other = transcript(field(row, "chosen")), transcript(field(row, "rejected"))
    if not chosen or not other:
        raise Skip("no messages")
    if chosen[-1].role != "assistant" or other[-1].role != "assistant":
        raise Skip("does not end with an assistant message")
    if other[:-1] != chosen[:-1]:
        raise Skip("chosen and rejected transcripts differ before the last reply")
    return [Preference(tuple(chosen[:-1]), chosen[-1], other[-1])]


SPEC = DatasetSpec(
    name="anthropic_hh",
    repo="Anthropic/hh-rlhf",
    files=("*/train.jsonl.gz",),
    to_conversations=to_conversations,
    rejected=rejected,
    pairs=pairs,
    description="Anthropic HH-RLHF preference pairs: every Human/Assistant turn of the chosen "
    "transcript, whose last reply is the preferred answer (Koala). With --pairs: the turns before the "
    "last reply as the prompt, the two transcripts' last replies as chosen and rejected.",
)
