"""The supervised loss and how it is normalised, shared by every engine.

A step's loss is the sum of token losses divided by the trained tokens of the whole optimizer step
(all data-parallel replicas, all accumulation micro-batches), so short and long conversations weigh
the same per token however they fall into micro-batches. Engines average what they are given over
micro-batches and replicas; `step_scale` undoes that average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatkit.tokenization import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions. logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


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
