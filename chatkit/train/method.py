"""Training methods: what turns rows into a loss. The loop and the engines never look inside one.

A method is a collate (rows of tokenized examples -> a batch of tensors) plus a loss (the model's
output, chatkit.train.loss.Output, and that batch -> a summed loss and summed statistics) plus the count that loss is normalised
by. Supervised fine-tuning is the first; preference training (DPO and its relatives,
chatkit.train.preference) is the second: its own three functions, not a new loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatkit.config import TrainConfig
from chatkit.data import collate_pairs, collate_rows
from chatkit.train.loss import Output, trained_count
from chatkit.train.preference import STATS, PreferenceLoss, pair_count, preference_loss

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    collate: Callable[[Sequence[Sequence[Any]], int], Batch]
    """Rows (each a list of whole examples packed together) and the pad id -> a batch (B, T)."""
    loss: Callable[[Output, Batch], tuple[torch.Tensor, torch.Tensor]]
    """The model's output (logits, or hidden states and head) and the batch -> (summed loss, summed
    statistics in `stat_names` order); both are divided later by the `count`s of the whole step."""
    count: Callable[[Batch], int]
    """The units the loss is a sum over (trained tokens for SFT, pairs for preference losses)."""
    stat_names: tuple[str, ...] = ()
    """Statistics logged beside the loss, each a mean per counted unit."""
    pairs: bool = False
    """Reads preference records (chatkit.conversation.Preference) instead of conversations."""
    reference: PreferenceLoss | None = None
    """Set when the loss compares against the model before training (its log-probabilities are
    computed once, chatkit.train.reference)."""

    def loss_sum(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The summed loss alone (the pipeline engine's loss function)."""
        return self.loss(Output(logits=logits), batch)[0]


def _sft_loss(output: Output, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return output.loss_sum(batch["labels"]), torch.zeros(0)


SFT = Method("sft", collate_rows, _sft_loss, trained_count)
METHODS = ("sft", "dpo")


def get_method(cfg: TrainConfig) -> Method:
    """The config's method: sft, or dpo with its `preference_loss` and parameters."""
    if cfg.method == "sft":
        return SFT
    if cfg.method != "dpo":
        raise ValueError(f"unknown training method {cfg.method!r}; known: {', '.join(METHODS)}")
    loss = PreferenceLoss(cfg.preference_loss, cfg.beta, cfg.simpo_gamma)
    return Method(
        f"dpo:{loss.kind}",
        collate_pairs,
        functools.partial(preference_loss, loss),
        pair_count,
        STATS,
        pairs=True,
        reference=loss if loss.needs_reference else None,
    )
