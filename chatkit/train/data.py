"""A run's data: tokenized sets (cached, tokenized once), the batch stream of each data-parallel
replica, and the validation shard of each."""

from __future__ import annotations

import gc
import math
import os

from loguru import logger

from chatkit.conversation import ConversationError
from chatkit.data import Batches, DataSource, Pair, TokenizedSet, describe, save_data_stats, tokenize_file
from chatkit.tokenization import IGNORE_INDEX, Encoded
from chatkit.train.context import Run, RunError


def _data_problem(e: Exception) -> str:
    """One line: a ConversationError names file, line and field; an OSError its file and the reason."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def load_sets(specs: list[str], run: Run) -> list[TokenizedSet]:
    """Rank 0 tokenizes (in several processes) and fills the cache; the other ranks then read it.

    A bad line (or an unreadable file) stops every rank together after each turn: rank 0 says it in one
    line (`file:line: field: ...`) and the others, which would otherwise lose their peer mid-collective,
    say nothing."""
    import torch.distributed as dist

    cfg = run.cfg
    procs = cfg.tokenize_procs or min(8, os.cpu_count() or 1)
    sets: list[TokenizedSet] = []
    for turn in (0, 1):
        problem = None
        if run.main == (turn == 0):
            try:
                sets = _tokenize(specs, run, procs)
            except (ConversationError, OSError) as e:
                problem = _data_problem(e)
            if problem:  # the failed tokenization's progress bar and worker pool are held in reference
                gc.collect()  # cycles with its exception: end them (clearing the bar) before the error prints
        problems: list[str | None] = [problem] * run.world
        if run.world > 1:
            dist.all_gather_object(problems, problem)  # also the barrier between the turns
        if reported := next((p for p in problems if p), None):
            raise RunError(reported, all_ranks=True)
    return sets


def _tokenize(specs: list[str], run: Run, procs: int) -> list[TokenizedSet]:
    cfg = run.cfg
    return [
        tokenize_file(
            DataSource.parse(spec).path,
            run.tokenizer,
            run.template,
            cfg.max_length,
            cfg.overlong,
            procs if run.main else 1,
            cfg.cache_dir or None,
            show_progress=run.main,
            pairs=run.method.pairs,
        )  # fmt: skip
        for spec in specs
    ]


def load_data(run: Run, dp_rank: int, dp_world: int) -> tuple[Batches, list[TokenizedSet]]:
    """Train sets as replica `dp_rank`'s batch stream, and the validation sets; logs what was kept."""
    cfg = run.cfg
    sources = [DataSource.parse(spec) for spec in cfg.train_files]
    sets = load_sets(cfg.train_files, run)
    val_sets = load_sets(cfg.val_files, run) if cfg.val_files else []
    if run.main:
        for src, ts in zip(sources, sets, strict=True):
            logger.info(describe(src.path, ts, cfg.max_length))
        save_data_stats(run.out / "data_stats.json", sources, sets)
    weights = None
    if any(src.weight is not None for src in sources):
        weights = [1.0 if src.weight is None else src.weight for src in sources]
    batches = Batches(
        sets, weights, cfg.micro_batch_size, cfg.max_length, cfg.pack, dp_rank, dp_world, cfg.seed, run.pad_id,
        run.method.collate,
    )  # fmt: skip
    return batches, val_sets


def val_shard(sets: list[TokenizedSet], rank: int, world: int, multiple: int = 1) -> list[Encoded | Pair]:
    """This replica's validation examples, as many on every replica (a multiple of `multiple`).

    Engines run forward passes collectively (ZeRO-3 gathers, pipelines pass activations), so shards
    are padded with a copy of an example whose labels are all ignored: it adds no loss and no count.
    """
    examples = [s.example(i) for s in sets for i in range(len(s))]
    per_rank = math.ceil(math.ceil(len(examples) / world) / multiple) * multiple
    shard = examples[rank::world]
    return shard + [filler(examples[0])] * (per_rank - len(shard))


def filler(example: Encoded | Pair) -> Encoded | Pair:
    """A copy of `example` with nothing trained (a pair of such copies: collate_pairs weighs it 0)."""
    if isinstance(example, Pair):
        return Pair(filler(example.chosen), filler(example.rejected))
    return Encoded(example.input_ids, [IGNORE_INDEX] * len(example.input_ids))
