"""The long-context sets OpenChatKit fine-tuned Llama-2-7B-32K on: multi-document QA and BookSum.

Upstream togethercomputer/Long-Data-Collections, `fine-tune/`: `natural_questions_10_200_docs.jsonl.zst`
(88,957 rows; OpenChatKit's finetune_llama-2-7b-32k-mqa.sh) and `booksum.jsonl.zst` (9,600 rows;
finetune_llama-2-7b-32k-booksum.sh). OpenChatKit streamed the same files from an earlier `data/`
folder and trained on `text` as plain language modelling. Each line holds `prompt` (the documents
or book chapter and the instruction), `completion` (the answer or summary) and `text` (the two
joined). Here the prompt is the user message and the completion the reply, both verbatim
(stripped); `text` is not used.
"""

from __future__ import annotations

from chatkit.datasets.spec import DatasetSpec, Messages, Skip, assistant, field, user


def to_conversations(row: dict) -> list[Messages]:
    if isinstance(row, dict) and ("prompt" not in row or "completion" not in row):
        raise Skip("no prompt/completion fields")
    return [[user(field(row, "prompt")), assistant(field(row, "completion"))]]


MQA = DatasetSpec(
    name="mqa",
    repo="togethercomputer/Long-Data-Collections",
    files=("fine-tune/natural_questions_10_200_docs.jsonl.zst",),
    to_conversations=to_conversations,
    description="Multi-document QA from Natural Questions (10-200 Wikipedia passages a question), "
    "as OpenChatKit fine-tuned Llama-2-7B-32K on it: the prompt is the user message, the "
    "completion (answer, long answer, gold document id) the reply.",
)

BOOKSUM = DatasetSpec(
    name="booksum",
    repo="togethercomputer/Long-Data-Collections",
    files=("fine-tune/booksum.jsonl.zst",),
    to_conversations=to_conversations,
    description="BookSum chapter summaries, as OpenChatKit fine-tuned Llama-2-7B-32K on them: the "
    "chapter and request are the user message, the summary the reply.",
)
