"""Stanford Alpaca's 52K instructions.

Upstream tatsu-lab/alpaca: `data/train-*.parquet` (52,002 rows) with `instruction`, `input`,
`output` and `text` (the rendered prompt, not used). A non-empty input joins the instruction in
the user message as `{instruction}\\n\\n### Input:\\n{input}`, which the `alpaca` template renders
as Alpaca's input prompt. The original JSON list (alpaca_data.json) reads the same way.
"""

from __future__ import annotations

from chatkit.datasets.spec import DatasetSpec, Messages, assistant, field, user, with_input


def to_conversations(row: dict) -> list[Messages]:
    return [
        [user(with_input(field(row, "instruction"), field(row, "input"))), assistant(field(row, "output"))]
    ]


SPEC = DatasetSpec(
    name="alpaca",
    repo="tatsu-lab/alpaca",
    files=("*.parquet",),
    to_conversations=to_conversations,
    description="Stanford Alpaca (52K self-instruct rows): instruction (+ input as '### Input:') "
    "is the user message, output the reply.",
)
