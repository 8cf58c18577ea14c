"""The run context: what every part of a training run needs to know, built once at start-up.

One object instead of the eight to ten arguments (config, rank, world, device, tokenizer, template,
output folder, ...) that would otherwise be passed from function to function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatkit.config import TrainConfig
from chatkit.templates import get_template
from chatkit.tokenization import add_template_tokens, padding_id
from chatkit.train.method import Method, get_method


class RunError(RuntimeError):
    """A run that cannot go on, for a reason a person can act on: printed as one line, no traceback.

    `all_ranks`: every rank raises it together (a decision made collectively), so rank 0 alone says it.
    """

    def __init__(self, message: str, all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks


@dataclass
class Run:
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    template: Any
    added_tokens: int
    """Marker tokens the template added to the tokenizer: the embeddings grow by as many."""
    method: Method

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes the run's files."""
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def pad_id(self) -> int:
        return padding_id(self.tokenizer)


def check_context(model_config, cfg: TrainConfig) -> None:
    """Rows longer than the model's positions would train on positions it never learned."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.max_length > context:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's context of {context} tokens")


def make_run(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Run:
    """Tokenizer and template as training and chat will both use them (template tokens added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    template = get_template(cfg.template, tokenizer, reasoning=cfg.reasoning)
    added = add_template_tokens(tokenizer, template)
    return Run(cfg, rank, world, device, tokenizer, template, added, get_method(cfg))
