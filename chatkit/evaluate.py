"""Held-out evaluation: exact match through the chat engine (the one bot.py uses), and preference
accuracy on held-out pairs.

Exact match: each conversation's last message is the reference answer; the model answers given
everything before it. Preferences: each pair is scored as training scores it (chatkit.data.fit_pair,
the template's labels); against a reference model (the one preference training started from) the
accuracy is DPO's reward accuracy, beta x (log-ratio of the chosen reply - log-ratio of the rejected
one) > 0; without one it is the share of pairs whose chosen reply is the more likely.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Conversation, iter_preferences, read_jsonl
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


@dataclass
class PreferenceResult:
    correct: int
    total: int
    margin: float
    """Mean of beta x (chosen - rejected) log-ratio (reward margin), or of the log-probability gap."""
    skipped: int
    """Pairs that do not fit the model's context (or score nothing)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def pair_logps(engine: ChatEngine, pairs: list, batch_size: int = 8):
    """(pairs, 2) summed log-probabilities of each pair's chosen and rejected replies."""
    import torch

    from chatkit.data import collate_pairs
    from chatkit.tokenization import padding_id
    from chatkit.train.attention import packed_forward_kwargs
    from chatkit.train.loss import Output
    from chatkit.train.preference import sequence_logps

    out = []
    model = engine.model
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs([[p] for p in pairs[i : i + batch_size]], padding_id(engine.tokenizer))
        # A row holds a pair's chosen then rejected reply: the model's attention keeps them apart from
        # the restarting positions (chatkit.train.attention), with no (T, T) mask built here.
        kwargs = packed_forward_kwargs(batch["position_ids"].to(device), model.config._attn_implementation)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device), **kwargs).logits
        logps, _ = sequence_logps(Output(logits=logits), {k: v.to(device) for k, v in batch.items()})
        out.append(logps.double().cpu().view(-1, 2))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)


def evaluate_preferences(
    engine: ChatEngine, path: str, reference: ChatEngine | None = None, beta: float = 0.1
) -> PreferenceResult:
    """Reward accuracy of `engine` against `reference` on the pairs of `path` (or, without a reference,
    how often the chosen reply is the more likely)."""
    from chatkit.data import fit_pair

    context = getattr(engine.model.config, "max_position_embeddings", None) or 2048
    pairs, skipped = [], 0
    for pref in tqdm(list(iter_preferences(path)), desc="score pairs", leave=False):
        pair, _ = fit_pair(engine.tokenizer, engine.template, pref, 2 * context)
        fits = pair is not None and max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) <= context
        if fits:
            pairs.append(pair)
        else:
            skipped += 1
    logps = pair_logps(engine, pairs)
    if reference is not None:
        logps = beta * (logps - pair_logps(reference, pairs))
    gap = logps[:, 0] - logps[:, 1]
    margin = float(gap.mean()) if len(gap) else 0.0
    return PreferenceResult(int((gap > 0).sum()), len(pairs), margin, skipped)
