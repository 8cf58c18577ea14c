"""A run's data: tokenized sets (tokenized once, before the ranks start, and memory-mapped by every
rank), the batch stream of each data-parallel replica, and the validation shard of each.

chatkit.launch (and tools/tokenize_data.py) tokenize what the cache lacks before any rank exists
(`prepare_data`), so no rank waits in a collective while another tokenizes: DeepSpeed's process-group
timeout (10 minutes) used to end the first run on a large data set, and every retry. A run started
without the launcher (`deepspeed training/train.py ...`) still works: the first rank of each node
tokenizes what is missing while the other ranks of the node watch the cache folder for it, outside
any collective, however long it takes.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time

import numpy as np
from loguru import logger

from chatkit.config import TrainConfig
from chatkit.conversation import ConversationError
from chatkit.data import (
    Batches,
    CacheEntry,
    DataSource,
    Pair,
    TokenizedSet,
    describe,
    save_data_stats,
    write_entry,
)
from chatkit.io import atomic_open
from chatkit.tokenization import IGNORE_INDEX, Encoded
from chatkit.train.context import Run, RunError, make_run

POLL_S = 0.5
"""How often a rank waiting for another's tokenization looks at the cache folder."""
_STARTED = time.time()
"""This process's start, near enough (ranks import this before they join the group): a failure note
older than that is a former run's."""


def _data_problem(e: Exception) -> str:
    """One line: a ConversationError names file, line and field; an OSError its file and the reason."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def tokenize_procs(cfg: TrainConfig) -> int:
    return cfg.tokenize_procs or min(8, os.cpu_count() or 1)


def _entry(spec: str, run: Run) -> CacheEntry:
    """Where `spec`'s tokenization is cached for this run (the key reads the file: a missing or
    unreadable one is a RunError naming it)."""
    cfg = run.cfg
    path = DataSource.parse(spec).path
    try:
        return CacheEntry.of(
            path, run.tokenizer, run.template, cfg.max_length, cfg.overlong, cfg.cache_dir or None, run.method.pairs
        )  # fmt: skip
    except OSError as e:
        raise RunError(_data_problem(e), all_ranks=True) from None


def _write(entry: CacheEntry, run: Run, procs: int, show_progress: bool) -> None:
    """Tokenize `entry`'s file into the cache; a bad line or an unreadable file is a RunError (one line)."""
    cfg = run.cfg
    try:
        write_entry(entry, run.tokenizer, run.template, cfg.max_length, cfg.overlong, procs, show_progress)
    except (ConversationError, OSError) as e:
        problem = _data_problem(e)
    else:
        return
    # The failed tokenization's progress bar and worker pool are held in reference cycles with its
    # exception: end them (clearing the bar) before the error prints.
    gc.collect()
    raise RunError(problem, all_ranks=True)


def prepare_data(cfg: TrainConfig, show_progress: bool = True) -> list[str]:
    """Tokenize every train and validation file of `cfg` that the cache lacks, keyed as the ranks will
    look it up (the same tokenizer with the template's tokens, template and method); one line per file
    tokenized. chatkit.launch runs it before the ranks start; tools/tokenize_data.py on its own.

    Raises RunError (one line naming the file, and the line and field of a bad row)."""
    import torch

    try:
        run = make_run(cfg, 0, 1, torch.device("cpu"))
    except (OSError, ValueError) as e:  # the tokenizer's files: the ranks would fail alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(f"model: cannot load the tokenizer of {cfg.model!r}: {first}") from None
    lines = []
    for spec in dict.fromkeys([*cfg.train_files, *cfg.val_files]):
        entry = _entry(spec, run)
        if entry.load() is not None:
            continue
        start = time.perf_counter()
        _write(entry, run, tokenize_procs(cfg), show_progress)
        ts = entry.load()
        if ts is None:
            raise RunError(f"{entry.path}: the tokenization cache entry just written cannot be read back")
        took = time.perf_counter() - start
        lines.append(f"tokenized in {took:.1f}s: {describe(entry.source, ts, cfg.max_length)}")
    return lines


def load_sets(specs: list[str], run: Run) -> list[TokenizedSet]:
    """The sets of `specs`, memory-mapped from the cache.

    A set the cache lacks (a run started without chatkit.launch) is tokenized by the first rank of each
    node while the node's other ranks wait for its entry to appear, polling the folder: never in a
    collective, which would time out on a large file. A bad line stops every rank: the tokenizing rank
    leaves its one-line reason beside the entry for the ones waiting, and rank 0 alone says it."""
    sets = []
    for spec in specs:
        entry = _entry(spec, run)
        ts = entry.load()
        if ts is None:
            ts = _tokenize_here(entry, run) if _first_on_node(run) else _wait_for(entry)
        sets.append(ts)
    return sets


def _first_on_node(run: Run) -> bool:
    return int(os.environ.get("LOCAL_RANK", run.rank)) == 0


def _tokenize_here(entry: CacheEntry, run: Run) -> TokenizedSet:
    if run.main:
        logger.info(
            f"{entry.source}: not in the tokenization cache, tokenizing it on this node's first rank "
            "(chatkit.launch and tools/tokenize_data.py tokenize before the ranks start)"
        )
    entry.failed.unlink(missing_ok=True)
    try:
        _write(entry, run, tokenize_procs(run.cfg), run.main)
    except RunError as e:
        with contextlib.suppress(OSError), atomic_open(entry.failed) as f:
            f.write(str(e))
        raise
    ts = entry.load()
    if ts is None:
        raise RunError(f"{entry.path}: the tokenization cache entry just written cannot be read back")
    return ts


def _wait_for(entry: CacheEntry) -> TokenizedSet:
    """The set once the node's first rank has written it; its failure, as a RunError, if it failed."""
    while True:
        ts = entry.load()
        if ts is not None:
            return ts
        try:
            if entry.failed.stat().st_mtime >= _STARTED - 2:  # slack for file systems with coarse times
                raise RunError(entry.failed.read_text(encoding="utf-8").strip(), all_ranks=True)
        except FileNotFoundError:
            pass
        time.sleep(POLL_S)


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
    Only this replica's examples are built (a rank's memory holds its shard, not the whole set).
    """
    ends = np.cumsum([len(s) for s in sets])
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return []

    def example(k: int) -> Encoded | Pair:
        f = int(np.searchsorted(ends, k, side="right"))
        return sets[f].example(k - (int(ends[f - 1]) if f else 0))

    per_rank = math.ceil(math.ceil(total / world) / multiple) * multiple
    shard = [example(k) for k in range(rank, total, world)]
    shard += [filler(example(0))] * (per_rank - len(shard))
    for s in sets:
        s.release()
    return shard


def filler(example: Encoded | Pair) -> Encoded | Pair:
    """A copy of `example` with nothing trained (a pair of such copies: collate_pairs weighs it 0)."""
    if isinstance(example, Pair):
        return Pair(filler(example.chosen), filler(example.rejected))
    return Encoded(example.input_ids, [IGNORE_INDEX] * len(example.input_ids))
