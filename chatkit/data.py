"""Tokenized training data: conversations -> (input_ids, labels), sharded by rank, padded per batch."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from loguru import logger
from tqdm import tqdm

from chatkit.conversation import iter_jsonl
from chatkit.templates import ChatTemplate
from chatkit.tokenization import IGNORE_INDEX, Encoded, encode_conversation


@dataclass
class TokenizedData:
    examples: list[Encoded]
    skipped_too_long: int
    skipped_untrained: int


def tokenize_files(
    files: Sequence[str], tokenizer, template: ChatTemplate, max_length: int, show_progress: bool = True
) -> TokenizedData:
    """Tokenize every conversation of `files`; skip (and count) those too long or with nothing trained."""
    examples, too_long, untrained = [], 0, 0
    for path in files:
        for conv in tqdm(iter_jsonl(path), desc=f"tokenize {path}", disable=not show_progress, leave=False):
            enc = encode_conversation(tokenizer, template, conv.messages)
            if len(enc.input_ids) > max_length:
                too_long += 1
            elif enc.num_trained == 0:
                untrained += 1
            else:
                examples.append(enc)
    if too_long or untrained:
        logger.warning(
            f"skipped {too_long} conversations over {max_length} tokens, {untrained} with no trained token"
        )
    return TokenizedData(examples, too_long, untrained)


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out and never trained."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def micro_batches(
    examples: Sequence[Encoded],
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    pad_id: int,
    start_epoch: int = 0,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless (epoch, batch) stream for one rank.

    Each epoch shuffles with `seed + epoch` (the same order on every rank), then rank r takes every
    world_size-th batch, so ranks see disjoint data and the same number of batches.
    """
    per_step = micro_batch_size * world_size
    if len(examples) < per_step:
        raise ValueError(f"{len(examples)} examples cannot fill one batch of {per_step} across ranks")
    epoch = start_epoch
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order) - per_step + 1, per_step):
            mine = order[start + rank * micro_batch_size : start + (rank + 1) * micro_batch_size]
            yield epoch, collate([examples[i] for i in mine], pad_id)
        epoch += 1
