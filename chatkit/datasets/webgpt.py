"""OpenAI WebGPT comparisons: pairs of long-form answers to one question, with human preference.

Upstream openai/webgpt_comparisons: the hub keeps a loading script on its main branch and the
rows as parquet on `refs/convert/parquet` (19,578 rows). OpenAI's own `comparisons.jsonl` (each
line a pair of records with `question`, `answer`, `score`) reads too. Fields used:
`question.full_text`, `answer_0`/`answer_1`, `score_0`/`score_1` (a preference from -1 to 1; the
positive one is preferred). Following Koala the preferred answer is the reply to the question;
ties (equal scores) are skipped. With --keep-rejected the other answer is written too, the
question ending with Koala's marker "An Unhelpful Answer:". With --pairs each comparison is one
preference record instead: the question, the preferred answer (chosen) and the other (rejected).

Not used: the browsing quotes (`quotes_*`) and tokens; answers may cite them as [1], [2].
"""

from __future__ import annotations

from typing import Any

from chatkit.datasets.spec import (
    DatasetSpec,
    RowError,
    Skip,
    field,
    preference_mappers,
    preference_pairs,
)


def _flat(row: Any) -> Any:
    """OpenAI's raw comparisons.jsonl holds each comparison as a list of its two records."""
    if not isinstance(row, list):
        return row
    if len(row) != 2 or not all(isinstance(r, dict) for r in row):
        raise RowError("expected a comparison object or a pair of records")
    flat = {"question": row[0].get("question")}
    for i, record in enumerate(row):
        flat[f"answer_{i}"], flat[f"score_{i}"] = record.get("answer"), record.get("score")
    return flat


def _pair(row: Any) -> tuple[str, str, str]:
    row = _flat(row)
    question = field(row, "question.full_text")
    answers = field(row, "answer_0"), field(row, "answer_1")
    s0, s1 = field(row, "score_0", (int, float)), field(row, "score_1", (int, float))
    if s0 == s1:
        raise Skip("tie (equal scores)")
    return (question, *answers) if s0 > s1 else (question, answers[1], answers[0])


to_conversations, rejected = preference_mappers(_pair)
pairs = preference_pairs(_pair)


SPEC = DatasetSpec(
    name="webgpt",
    repo="openai/webgpt_comparisons",
    revision="refs/convert/parquet",
    files=("*.parquet",),
    to_conversations=to_conversations,
    rejected=rejected,
    pairs=pairs,
    description="OpenAI WebGPT comparisons: the question, then the answer humans preferred "
    "(Koala); ties are skipped. With --pairs: the question as the prompt, the preferred answer as "
    "chosen and the other as rejected.",
)
