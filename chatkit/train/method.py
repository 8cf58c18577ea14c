"""Training methods: what turns rows into a loss. The loop and the engines never look inside one.

A method is a collate (rows of tokenized examples -> a batch of tensors) plus a loss (the model's
logits and that batch -> a summed loss) plus the count that loss is normalised by. Supervised
fine-tuning is the first; a preference method adds its own three functions, not a new loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chatkit.data import collate_rows
from chatkit.tokenization import Encoded
from chatkit.train.loss import token_loss_sum, trained_count

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    collate: Callable[[Sequence[Sequence[Encoded]], int], Batch]
    """Rows (each a list of whole examples packed together) and the pad id -> a batch (B, T)."""
    loss_sum: Callable[[torch.Tensor, Batch], torch.Tensor]
    """Logits (B, T, V) and the batch -> the summed loss of the batch (divided later by `count`s)."""
    count: Callable[[Batch], int]
    """The units the loss is a sum over (trained tokens for SFT)."""


def _sft_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return token_loss_sum(logits, batch["labels"])


SFT = Method("sft", collate_rows, _sft_loss, trained_count)
METHODS: dict[str, Method] = {SFT.name: SFT}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(METHODS)}") from None
