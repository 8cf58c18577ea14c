"""The reference model's log-probabilities for DPO, IPO and hinge: the model before training, once.

Instead of a second model held beside the one being trained (TRL's default: twice the weights and a
second forward pass every step), every pair's chosen and rejected log-probabilities are computed by
the engine's own model right after it is loaded, before the first step and before a checkpoint is
resumed, so they are the starting model's whatever the step. The pairs are spread over the
data-parallel replicas and summed into one (pairs, 2) array on every rank: 16 bytes per pair.

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

from chatkit.data import TokenizedSet, collate_pairs, default_cache_dir
from chatkit.io import atomic_open
from chatkit.train.context import Run
from chatkit.train.data import filler
from chatkit.train.preference import sequence_logps


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


def compute(run: Run, engine, ts: TokenizedSet) -> np.ndarray:
    """(pairs, 2) log-probabilities of every pair's replies under the current model, on every rank.

    Every rank runs as many forward passes (ZeRO-3 forwards are collective): a rank short of pairs
    runs a filler pair whose result is dropped."""
    import torch.distributed as dist

    mbs, n = run.cfg.micro_batch_size, len(ts)
    mine = list(range(engine.dp_rank, n, engine.dp_world))
    rounds = math.ceil(math.ceil(n / engine.dp_world) / mbs)
    out = torch.zeros(n, 2, dtype=torch.float64, device=run.device)
    spare = filler(ts.example(0))
    bar = tqdm(total=n, desc="reference log-probs", unit=" pair", disable=not run.main, leave=False)
    for r in range(rounds):
        idx = mine[r * mbs : (r + 1) * mbs]
        pairs = [ts.example(j) for j in idx] or [spare]
        batch = collate_pairs([[p] for p in pairs], run.pad_id)
        logps, _ = sequence_logps(engine.logits(batch), batch)
        if idx:
            out[idx] = logps.detach().double().view(-1, 2)[: len(idx)]
        bar.update(len(idx) * engine.dp_world)
    bar.close()
    dist.all_reduce(out)  # every pair was computed by exactly one rank; the others hold zeros there
    return out.cpu().numpy()


def _from_rank0(array: np.ndarray | None, n: int, device: torch.device) -> np.ndarray:
    import torch.distributed as dist

    t = torch.zeros(n, 2, dtype=torch.float64, device=device)
    if array is not None:
        t.copy_(torch.from_numpy(array))
    dist.broadcast(t, src=0)
    return t.cpu().numpy()


def attach(run: Run, engine, sets: list[TokenizedSet]) -> None:
    """Give every preference set its reference log-probabilities: from the cache, else computed."""
    import torch.distributed as dist

    for ts in sets:
        path = cache_path(run, ts)
        cached = _read(path, len(ts)) if run.main else None
        found = [cached is not None]
        dist.broadcast_object_list(found, src=0)
        if found[0]:
            ts.reference = _from_rank0(cached, len(ts), run.device)
            if run.main:
                logger.info(f"reference log-probabilities of {len(ts)} pairs read from {path}")
            continue
        t0 = time.perf_counter()
        ts.reference = compute(run, engine, ts)
        if run.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                np.save(f, ts.reference)
            logger.info(
                f"reference log-probabilities of {len(ts)} pairs computed in {time.perf_counter() - t0:.1f}s "
                f"(the model before training; cached in {path})"
            )


def _read(path: Path, n: int) -> np.ndarray | None:
    """The cached array, or None if absent or not what is expected (a damaged file is recomputed)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        logger.warning(f"{path}: unreadable reference cache ({e}); computing again")
        return None
    if array.shape != (n, 2) or array.dtype != np.float64 or not np.isfinite(array).all():
        logger.warning(
            f"{path}: reference cache of the wrong shape or with non-finite values; computing again"
        )
        return None
    return array
