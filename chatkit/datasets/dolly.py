"""Dolly-15k with OpenAlpaca's removal of over-long examples.

Upstream databricks/databricks-dolly-15k: `databricks-dolly-15k.jsonl` (15,011 rows) with
`instruction`, `context`, `response`, `category`. OpenAlpaca (yxuansu/OpenAlpaca,
process_dataset.py) kept a row only if its instruction, context and response together have at
most 2,000 whitespace-separated words; the same rule skips the others here, counted. The context
goes into the user message as Alpaca's input: `{instruction}\\n\\n### Input:\\n{context}`.
"""

from __future__ import annotations

from chatkit.datasets.spec import DatasetSpec, Messages, Skip, assistant, field, user, with_input

MAX_WORDS = 2000  # OpenAlpaca: instruction + input + output, counted with str.split()


def to_conversations(row: dict) -> list[Messages]:
    instruction, context, response = field(row, "instruction"), field(row, "context"), field(row, "response")
    if len(instruction.split()) + len(context.split()) + len(response.split()) > MAX_WORDS:
        raise Skip(f"over {MAX_WORDS} words (OpenAlpaca's length filter)")
    return [[user(with_input(instruction, context)), assistant(response)]]


SPEC = DatasetSpec(
    name="dolly",
    repo="databricks/databricks-dolly-15k",
    files=("databricks-dolly-15k.jsonl",),
    to_conversations=to_conversations,
    description="Databricks Dolly-15k, minus OpenAlpaca's over-long rows (more than 2,000 words): "
    "instruction (+ context as Alpaca's '### Input:') is the user message, response the reply.",
)
