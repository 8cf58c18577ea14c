"""What the training loop asks of an engine (chatkit.train.loop.fit), and nothing more.

Two engines implement it: ZeRO (chatkit.train.zero: the model replicated or partitioned over data
parallel ranks) and pipeline (chatkit.train.pipeline: the layers split into stages, times data
parallel replicas). Every method is called by every rank together: most are collectives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from chatkit.data import TokenizedSet

Batch = dict[str, torch.Tensor]


class Engine(Protocol):
    dp_rank: int
    """This rank's data-parallel replica: which shard of the batch stream it reads."""
    dp_world: int
    """Data-parallel replicas: ranks that see different rows in one step."""

    def setup(self, total_steps: int) -> None:
        """Load the model and wrap it with DeepSpeed; the schedule runs over `total_steps`."""

    def describe(self) -> tuple[str, int]:
        """The layout for the start-up line (`2 rank(s)`, `4 rank(s) = 2 pipeline stages x 2 ...`)
        and the model's parameter count."""

    def dp_sum(self, values: list[float]) -> list[float]:
        """Sum over the data-parallel replicas, on the engine's device."""

    def train_step(self, micro: list[Batch], count: float) -> dict[str, float]:
        """One optimizer step over this replica's micro-batches; `count` is the method's count of the
        whole step (all replicas: trained tokens, or pairs). Returns {"loss": the step's loss per unit,
        and the method's statistics per unit}, the same on all ranks."""

    def evaluate(self, val_sets: list[TokenizedSet]) -> dict[str, float]:
        """{"loss": validation loss per unit, and the method's statistics} over every replica's shard,
        the same on all ranks."""

    def token_logps(self, batch: Batch) -> torch.Tensor:
        """(B, T-1) log-probabilities of `batch`'s next labels, 0 where ignored, without gradients (the
        reference pass of preference training; every rank calls it as often). The pipeline engine
        does not offer it."""

    def sample(self, prompts: list[str]) -> list[str]:
        """Greedy replies to `prompts`, the same on all ranks (which stop together)."""

    def save(self, step: int, epoch: int) -> Path:
        """Write checkpoint `stepN` atomically (chatkit.train.checkpoint); returns its folder."""

    def resume(self, root: Path, tag: str) -> int:
        """Restore checkpoint `root/tag` (weights, optimizer, schedule, random state); returns its step."""

    def lr(self) -> float:
        """The learning rate of the last step."""
