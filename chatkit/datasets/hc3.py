"""HC3 (Human ChatGPT Comparison Corpus, English): questions with human and ChatGPT answers.

Upstream Hello-SimpleAI/HC3: `all.jsonl` (the five domains together; also one file a domain, read
from a --source folder that holds no all.jsonl) with `question`, `human_answers` (list),
`chatgpt_answers` (list) and `source`. As Koala used it, each
answer, human or ChatGPT, is its own conversation: the question, then that answer. All answers of
one question go to the same split.
"""

from __future__ import annotations

from chatkit.datasets.spec import DatasetSpec, Messages, Skip, assistant, field, string_list, user

DOMAINS = ("reddit_eli5", "open_qa", "wiki_csai", "medicine", "finance")  # all.jsonl = the five files


def to_conversations(row: dict) -> list[Messages]:
    question = field(row, "question")
    answers = string_list(row, "human_answers") + string_list(row, "chatgpt_answers")
    if not answers:
        raise Skip("no answers")
    return [[user(question), assistant(answer)] for answer in answers]


SPEC = DatasetSpec(
    name="hc3",
    repo="Hello-SimpleAI/HC3",
    files=("all.jsonl",),
    other_files=tuple(f"{domain}.jsonl" for domain in DOMAINS),
    to_conversations=to_conversations,
    description="HC3 English: one conversation per answer (human and ChatGPT answers alike), "
    "the question as the user message, as Koala used it.",
)
