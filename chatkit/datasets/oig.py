"""OIG: LAION's Open Instruction Generalist, the instruction data of OpenChatKit's first models.

Upstream laion/OIG: `unified_*.jsonl`, one object a line with `text` (turns written as
`<human>: ...` and `<bot>: ...` lines) and `metadata` (not used). Every turn is kept: a line
starting with `<human>:` or `<bot>:` opens a user or assistant message. Text before the first
marker (some files open with background text) is joined to the first user message, or becomes
one. OpenChatKit trained on all the unified files (~40 GB); Koala used three of them
(`--files unified_grade_school_math_instructions.jsonl unified_poetry_2_song.jsonl
unified_plot_screenplay_books_dialog.jsonl`). The recipes read one folder per file
(`data/OIG/files/unified_ni/train.jsonl`; Koala's three in `data/OIG/files/koala`): `--recipe`
prepares them all, `recipe_folder` says which files a folder holds.

Assumption (not checked against every file): markers start a line; a marker inside a line is
left as text, and a row whose last turn is not the bot's is skipped with that reason.
"""

from __future__ import annotations

import re

from chatkit.conversation import Message
from chatkit.datasets.spec import DatasetSpec, Messages, Skip, field, split_turns

MARKER = re.compile(r"^<(human|bot)>:[ \t]*", re.MULTILINE)
ROLES = {"human": "user", "bot": "assistant"}


def to_conversations(row: dict) -> list[Messages]:
    preamble, messages = split_turns(field(row, "text"), MARKER, ROLES)
    if not messages:
        raise Skip("no <human>:/<bot>: turns")
    if preamble:
        if messages[0].role == "user":
            messages[0] = Message("user", f"{preamble}\n{messages[0].content}")
        else:
            messages.insert(0, Message("user", preamble))
    return [messages]


KOALA_FILES = (
    "unified_grade_school_math_instructions.jsonl",
    "unified_poetry_2_song.jsonl",
    "unified_plot_screenplay_books_dialog.jsonl",
)
"""The three OIG files Koala trained on (config/koala.yaml reads them from data/OIG/files/koala)."""
GROUPS = {"koala": KOALA_FILES}


def recipe_folder(folder: str) -> tuple[str, ...] | None:
    """The upstream files a recipe's `data/OIG/files/<folder>` holds: `unified_X` is `unified_X.jsonl`
    (OpenChatKit's mixture, one folder a file), a name in GROUPS its files; None otherwise."""
    if folder in GROUPS:
        return GROUPS[folder]
    if folder.startswith("unified_"):
        return (f"{folder}.jsonl",)
    return None


SPEC = DatasetSpec(
    name="OIG",
    repo="laion/OIG",
    files=("unified_*.jsonl",),
    recipe_folders=recipe_folder,
    to_conversations=to_conversations,
    description="LAION's Open Instruction Generalist (OpenChatKit's fine-tuning data): every "
    "<human>:/<bot>: turn of each row's text becomes a user/assistant message.",
)
