"""Held-out exact-match evaluation through the chat engine (the one bot.py uses).

Each conversation's last message is the reference answer; the model answers given everything before it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Conversation, read_jsonl
from chatkit.io import write_jsonl


@dataclass
class EvalResult:
    correct: int
    total: int
    per_source: dict[str, tuple[int, int]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _split(conv: Conversation, where: str):
    if conv.messages[-1].role != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's reference answer")
    return list(conv.messages[:-1]), conv.messages[-1].content


def evaluate_exact_match(
    engine: ChatEngine, path: str, max_new_tokens: int = 64, predictions: str | None = None
) -> EvalResult:
    convs = read_jsonl(path)
    params = GenerationParams(max_new_tokens=max_new_tokens, sample=False)
    right, total, rows = Counter(), Counter(), []
    for i, conv in enumerate(tqdm(convs, desc="evaluate", leave=False)):
        history, reference = _split(conv, f"{path}: conversation {i + 1}")
        answer = engine.reply(history, params)
        ok = answer.strip() == reference.strip()
        right[conv.source] += ok
        total[conv.source] += 1
        rows.append({"source": conv.source, "reference": reference, "answer": answer, "correct": ok})
    if predictions:
        write_jsonl(predictions, rows)
    per = {s: (right[s], total[s]) for s in sorted(total)}
    return EvalResult(sum(right.values()), sum(total.values()), per)
