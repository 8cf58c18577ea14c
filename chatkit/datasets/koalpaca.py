"""KoAlpaca v1.1a: Korean instructions and answers (questions from Naver KnowledgeiN).

Upstream beomi/KoAlpaca-v1.1a: `data/train-*.parquet` with `instruction`, `output` and `url` (the
question's page, not used). Instruction is the user message, output the reply.
"""

from __future__ import annotations

from chatkit.datasets.spec import DatasetSpec, Messages, assistant, field, user


def to_conversations(row: dict) -> list[Messages]:
    return [[user(field(row, "instruction")), assistant(field(row, "output"))]]


SPEC = DatasetSpec(
    name="koalpaca",
    repo="beomi/KoAlpaca-v1.1a",
    files=("*.parquet",),
    to_conversations=to_conversations,
    description="KoAlpaca v1.1a (Korean): instruction is the user message, output the reply.",
)
