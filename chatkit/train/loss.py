"""The supervised loss and how it is normalised, shared by every engine.

A step's loss is the sum of token losses divided by the trained tokens of the whole optimizer step
(all data-parallel replicas, all accumulation micro-batches), so short and long conversations weigh
the same per token however they fall into micro-batches. Engines average what they are given over
micro-batches and replicas; `step_scale` undoes that average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatkit.tokenization import IGNORE_INDEX
from chatkit.train.chunked import chunked_token_logps, chunked_token_loss_sum


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each position's log-probability of its next label, (B, T-1) fp32, 0 where the label is ignored."""
    shifted = labels[:, 1:]
    logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted.clamp(min=0), reduction="none")
    return logps.masked_fill(shifted == IGNORE_INDEX, 0.0)


@dataclass(frozen=True)
class Output:
    """What a forward pass hands the method's loss: the logits (B, T, V), or the last hidden states
    (B, T, C) and the output projection, from which the loss is taken chunk by chunk without the whole
    logit matrix (chatkit.train.chunked: 800 MB of fp32 logits for one 4,096-token row of a 50k
    vocabulary). Methods ask for what they need, a summed loss or per-token log-probabilities, and
    never see which one the engine chose."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def loss_sum(self, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy over trained positions (`token_loss_sum`)."""
        if self.logits is not None:
            return token_loss_sum(self.logits, labels)
        return chunked_token_loss_sum(self.hidden, self.weight, labels, bias=self.bias)

    def token_logps(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, T-1) log-probabilities of the next labels, 0 where ignored (`token_logps`)."""
        if self.logits is not None:
            return token_logps(self.logits, labels)
        return chunked_token_logps(self.hidden, self.weight, labels, bias=self.bias)


def trained_count(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is a target: what the summed loss is divided by."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (padding has negative segment ids)."""
    return int((batch["segment_ids"] >= 0).sum())


def per_unit(stat_names: tuple[str, ...], sums: list[float], count: float) -> dict[str, float]:
    """{"loss": ..., stat: ...}: the summed loss and statistics of a step (or an evaluation), all
    replicas, divided by the units they were summed over."""
    return dict(zip(("loss", *stat_names), (v / max(count, 1) for v in sums), strict=True))


def step_scale(global_count: float, replicas: int, accumulation: int) -> float:
    """Per-micro-batch loss factor: engines divide by accumulation and average over replicas; undo
    both, so the gradient is that of (sum of token losses / trained tokens of the step)."""
    return replicas * accumulation / max(global_count, 1)
