"""The reference model's log-probabilities for DPO, IPO and hinge: the model before training, once.

Instead of a second model held beside the one being trained (TRL's default: twice the weights and a
second forward pass every step), every pair's chosen and rejected log-probabilities are computed by
the engine's own model right after it is loaded, before the first step and before a checkpoint is
resumed, so they are the starting model's whatever the step. The pairs are spread over the
data-parallel replicas, packed into rows as in training, and summed into one (pairs, 2) array on
every rank: 16 bytes per pair.

The array is cached beside the tokenized data under a key made from the tokenized set's key and the
model folder's files (names, sizes, modification times), precision, quantization and seed (the seed
initialises embeddings for added template tokens). Only rank 0 reads and writes the cache; it
broadcasts what it read, so nodes need not share the cache folder.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from tqdm import tqdm

from chatkit.data import Batches, TokenizedSet, collate_pairs, default_cache_dir, pack_best_fit
from chatkit.io import atomic_open
from chatkit.train.context import Run
from chatkit.train.data import filler
from chatkit.train.preference import sequence_sums


def model_key(run: Run) -> str:
    """What the starting model's outputs depend on, besides the data (a cheap stand-in for hashing
    tens of GB of weights: a rewritten file changes its size or modification time)."""
    cfg = run.cfg
    h = hashlib.blake2b(digest_size=12)
    root = Path(cfg.model)
    for f in sorted(root.iterdir()) if root.is_dir() else []:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(f"{cfg.model}\0{cfg.precision}\0{cfg.quantize}\0{cfg.seed}\0{run.added_tokens}".encode())
    return h.hexdigest()


def cache_path(run: Run, ts: TokenizedSet) -> Path:
    cache = Path(run.cfg.cache_dir) if run.cfg.cache_dir else default_cache_dir()
    return cache / f"reference-{ts.key}-{model_key(run)}.npy"


def compute(run: Run, engine, ts: TokenizedSet, todo: np.ndarray) -> np.ndarray:
    """(pairs, 2) log-probabilities under the current model of the pairs `todo` lists (0 elsewhere),
    the same on every rank.

    Pairs are packed into rows as training packs them (`pack`), micro_batch_size rows a forward pass:
    without gradients a pass needs less memory than a training step on the same rows. Every rank runs
    as many passes (ZeRO-3 forwards are collective): a rank short of rows runs a filler pair whose
    result is dropped."""
    import torch.distributed as dist

    cfg, n = run.cfg, len(ts)
    mine = [int(j) for j in todo[engine.dp_rank :: engine.dp_world]]
    if cfg.pack:
        packed = pack_best_fit([int(ts.lengths[j]) for j in mine], cfg.max_length)
        rows = [[mine[k] for k in row] for row in packed]
    else:
        rows = [[j] for j in mine]
    rounds = torch.tensor([math.ceil(len(rows) / cfg.micro_batch_size)], device=run.device)
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    out = torch.zeros(n, 2, dtype=torch.float64, device=run.device)
    spare = filler(ts.example(0))
    bar = tqdm(total=len(todo), desc="reference log-probs", unit=" pair", disable=not run.main, leave=False)
    for r in range(int(rounds.item())):
        chunk = rows[r * cfg.micro_batch_size : (r + 1) * cfg.micro_batch_size]
        idx = [j for row in chunk for j in row]
        batch = collate_pairs([[ts.example(j) for j in row] for row in chunk] or [[spare]], run.pad_id)
        logps, _ = sequence_sums(engine.token_logps(batch), batch)
        if idx:
            out[idx] = logps.detach().double().view(-1, 2)[: len(idx)]
        bar.update(min(len(idx) * engine.dp_world, len(todo) - bar.n))
    bar.close()
    dist.all_reduce(out)  # every pair was computed by exactly one rank; the others hold zeros there
    return out.cpu().numpy()


def used_pairs(batches: Batches, steps: int, accumulation: int) -> list[np.ndarray]:
    """Per training set, whether the run's `steps` draw each pair: a run of max_steps over a large set
    scores only what it trains on (the rows of each epoch depend only on seed and epoch)."""
    used = [np.zeros(len(s), dtype=bool) for s in batches.sets]
    per = batches.micro_batch_size * batches.world_size * accumulation  # rows per step
    left, epoch = steps * per, 0
    while left > 0:
        rows = batches.rows(epoch)
        take = min(left, len(rows) // per * per)  # an epoch ends after its last whole step
        if take == 0:
            break  # too few rows for one batch: the run itself says so
        for row in rows[:take]:
            for f, j in row:
                used[f][j] = True
        left -= take
        epoch += 1
    return used


def _from_rank0(array: np.ndarray | None, n: int, device: torch.device) -> np.ndarray:
    """Rank 0's cached array (NaN where nothing is cached) on every rank."""
    import torch.distributed as dist

    t = torch.full((n, 2), math.nan, dtype=torch.float64, device=device)
    if array is not None:
        t.copy_(torch.from_numpy(array))
    dist.broadcast(t, src=0)
    return t.cpu().numpy()


def attach(run: Run, engine, sets: list[TokenizedSet], needed: list[np.ndarray | None]) -> None:
    """Give every preference set the reference log-probabilities of the pairs `needed` marks (None: all
    of them): read from the cache what it holds, compute the rest, and cache the union."""
    for ts, want in zip(sets, needed, strict=True):
        path = cache_path(run, ts)
        ref = _from_rank0(_read(path, len(ts)) if run.main else None, len(ts), run.device)
        want = np.ones(len(ts), dtype=bool) if want is None else want
        todo = np.flatnonzero(want & np.isnan(ref[:, 0]))
        if len(todo):
            t0 = time.perf_counter()
            ref[todo] = compute(run, engine, ts, todo)[todo]
            if run.main:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(path, "wb") as f:
                    np.save(f, ref)
                logger.info(
                    f"reference log-probabilities of {len(todo)} pairs computed in {time.perf_counter() - t0:.1f}s "
                    f"(the model before training; cached in {path})"
                )
        elif run.main:
            logger.info(f"reference log-probabilities of {int(want.sum())} pairs read from {path}")
        ts.reference = ref


def _read(path: Path, n: int) -> np.ndarray | None:
    """The cached array (NaN for pairs never scored), or None if absent or damaged (scored again)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        logger.warning(f"{path}: unreadable reference cache ({e}); computing again")
        return None
    if array.shape != (n, 2) or array.dtype != np.float64 or np.isinf(array).any():
        logger.warning(f"{path}: reference cache of the wrong shape or with infinite values; computing again")
        return None
    return array
