"""Checks every rank makes before training, so that a run fails in its first minute with one line
instead of hours later, or hangs:

- `check_backend`: one small all-reduce, with a timeout: the network between the ranks works (a wrong
  NCCL interface hangs the first collective for good);
- `check_same_run`: every rank runs the same chatkit source, libraries and resolved config (a node
  with an old checkout trains on, differently, until it deadlocks or corrupts a checkpoint);
- `check_disk_room`: output_dir has room for the checkpoints still to come (a full disk is otherwise
  found by the first save, after the work is done).

The shared-folder check is chatkit.train.distributed.check_shared_output_dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from chatkit.config import REPO_ROOT, TrainConfig
from chatkit.train.context import RunError

BACKEND_CHECK_S = 300.0
"""The longest the first all-reduce may take (capped by collective_timeout_s): nccl sets up its
communicators in it, which takes seconds, tens of them over many nodes."""
NODE_LOCAL = ("output_dir", "cache_dir")
"""Settings that may differ between nodes: each node's path to the shared output folder (mount points
differ), each node's own tokenization cache."""
LIBRARIES = ("torch", "deepspeed", "transformers", "peft")


class BackendTimeout(RunError):
    """The first collective never completed: a rank exits at once (a clean shutdown would wait on it)."""


def check_backend(rank: int, world: int, device: torch.device, timeout_s: float) -> None:
    """All-reduce (1, rank) over every rank within `timeout_s`; else stop with one line naming this rank."""
    import torch.distributed as dist

    host = socket.gethostname()
    t = torch.tensor([1.0, float(rank)], dtype=torch.float64, device=device)
    work = dist.all_reduce(t, async_op=True)
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise BackendTimeout(
                f"rank {rank} ({host}): the first all-reduce over {dist.get_backend()} did not complete in "
                f"{timeout_s:.0f} s: the ranks cannot reach each other (a firewall, or on GPUs the network "
                "interface NCCL picked: NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE; `python -m chatkit.launch "
                "--help`), or a rank did not start (its error is above)"
            )
        time.sleep(0.01)
    work.wait()
    got, expected = t.tolist(), [float(world), world * (world - 1) / 2]
    if got != expected:
        raise RunError(
            f"rank {rank} ({host}): the first all-reduce over {dist.get_backend()} returned {got}, not "
            f"{expected}: the collective backend is broken on this machine"
        )


# --- the same code and config on every rank --------------------------------------------------------


def source_hashes() -> dict[str, str]:
    """sha256 of each of chatkit's source files, and of the training script, by path."""
    package = Path(__file__).resolve().parents[1]
    files = sorted(package.rglob("*.py"))
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.is_file() and script.suffix == ".py":
        files.append(script)
    out = {}
    for path in files:
        name = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path.name
        out[str(name)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fingerprint(cfg: TrainConfig, sources: dict[str, str]) -> dict[str, Any]:
    """What must be equal on every rank: the source's hash, library versions, the resolved config."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    config = {k: json.dumps(v) for k, v in dataclasses.asdict(cfg).items() if k not in NODE_LOCAL}
    source = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()
    return {"source": source, "versions": versions, "config": config}


def rank_list(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _differences(a: dict[str, Any], b: dict[str, Any], files: tuple[dict, dict] | None) -> list[str]:
    """How fingerprint `b` differs from `a`, one short phrase each."""
    out = []
    if a["source"] != b["source"]:
        changed = []
        if files is not None:
            fa, fb = files
            changed = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        out.append(f"chatkit's source ({', '.join(changed[:3])}{more})" if changed else "chatkit's source")
    for name, version in a["versions"].items():
        if b["versions"].get(name) != version:
            out.append(f"{name} {b['versions'].get(name)} (rank 0: {version})")
    for key, value in a["config"].items():
        if b["config"].get(key) != value:
            out.append(f"config {key}={b['config'].get(key)} (rank 0: {value})")
    return out


def describe_mismatch(found: list[tuple[str, dict]], files: list[dict[str, str]] | None = None) -> str | None:
    """None when every rank's (host, fingerprint) equals rank 0's; else one line naming the ranks and
    hosts that differ and, for the first of them, how (the files, with `files`: each rank's hashes)."""
    host0, fp0 = found[0]
    odd = [r for r, (_, fp) in enumerate(found) if fp != fp0]
    if not odd:
        return None
    first = odd[0]
    pair = (files[0], files[first]) if files else None
    hosts: dict[str, list[int]] = {}
    for r in odd:
        hosts.setdefault(found[r][0], []).append(r)
    who = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {rank_list(rs)} on {h}" for h, rs in hosts.items())
    how = ", ".join(_differences(fp0, found[first][1], pair))
    return (
        f"the ranks do not run the same code and config: {who} differ from rank 0 on {host0}; rank {first}: "
        f"{how}. Install the same chatkit and libraries on every node and launch each with the same recipe "
        "and overrides"
    )


def check_same_run(cfg: TrainConfig, rank: int, world: int) -> None:
    """All-gather each rank's fingerprint; stop every rank with one line when any differs from rank 0's."""
    import torch.distributed as dist

    sources = source_hashes()
    found: list[Any] = [None] * world
    dist.all_gather_object(found, (socket.gethostname(), fingerprint(cfg, sources)))
    if describe_mismatch(found) is None:
        return
    files: list[Any] = [None] * world
    if any(fp["source"] != found[0][1]["source"] for _, fp in found):  # name the files: a second round
        dist.all_gather_object(files, sources)
    raise RunError(describe_mismatch(found, files if files[0] else None), all_ranks=True)


# --- room for the checkpoints to come --------------------------------------------------------------


def checkpoint_bytes(params: int, trainable: int, precision: str, zero_stage: int) -> int:
    """About what one DeepSpeed checkpoint takes on disk, over all ranks.

    Adam keeps two fp32 states a trainable parameter, and mixed precision or ZeRO (any stage) an fp32
    master copy besides: 12 bytes; plain fp32 without ZeRO steps the weights themselves: 8. The
    weights are saved in the training precision too, except under ZeRO-3, where the trainable ones are
    in the optimizer's fp32 partitions only."""
    width = 4 if precision == "fp32" else 2
    per_trainable = 8 if zero_stage == 0 and precision == "fp32" else 12
    saved_weights = params - trainable if zero_stage == 3 else params
    return width * saved_weights + per_trainable * trainable


def checkpoints_ahead(start: int, steps: int, save_every: int, keep: int, existing: int) -> int:
    """How many more checkpoints output_dir will hold at its fullest: the saves still to come (every
    save_every steps and the last), bounded by keep_checkpoints (+1: a new one is complete before the
    oldest is deleted)."""
    saves = sum(1 for s in range(start + 1, steps + 1) if s == steps or (save_every and s % save_every == 0))
    if keep <= 0 or saves == 0:
        return saves
    return min(saves, max(1, keep + 1 - existing))


def room_problem(folder: Path, need: int, free: int, what: str) -> str | None:
    """None when `free` bytes hold `need`; else the one-line problem."""
    if free >= need:
        return None
    gib = 1024**3
    return (
        f"output_dir {folder} has {free / gib:.1f} GiB free and the checkpoints still to come need about "
        f"{need / gib:.1f} GiB ({what}): free space there, lower keep_checkpoints or raise save_every, or "
        "choose another output_dir"
    )


def _counts(engine: Any) -> tuple[int, int, int]:
    """(parameters, trainable parameters, ZeRO stage) of an engine (chatkit.train.engine.Engine)."""
    params = engine.describe()[1]
    ds = getattr(engine, "engine", None)
    stage = int(ds.zero_optimization_stage()) if hasattr(ds, "zero_optimization_stage") else 0
    module = getattr(ds, "module", None)
    if module is None or not hasattr(module, "peft_config"):
        return params, params, stage  # full fine-tuning: every weight trains
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
    return params, trainable, stage


def check_disk_room(cfg: TrainConfig, engine: Any, rank: int, start: int, steps: int) -> None:
    """Rank 0 compares output_dir's free space with the checkpoints still to come, and every rank
    stops with its answer. With keep_checkpoints=0 (keep all) only the next save must fit, since a
    person may move old checkpoints away as the run goes; all of them not fitting is a warning."""
    import torch.distributed as dist

    from chatkit.train.checkpoint import _step_dirs, checkpoint_root

    answer: list[Any] = [None]
    if rank == 0:
        params, trainable, stage = _counts(engine)
        one = checkpoint_bytes(params, trainable, cfg.precision, stage)
        root = checkpoint_root(cfg)
        ahead = checkpoints_ahead(start, steps, cfg.save_every, cfg.keep_checkpoints, len(_step_dirs(root)))
        free = shutil.disk_usage(root if root.exists() else Path(cfg.output_dir)).free

        def problem(n: int) -> str | None:
            what = (
                f"{n} x {one / 1024**3:.2f} GiB: {params:,} parameters, {trainable:,} trained, "
                f"ZeRO stage {stage}, {cfg.precision}, keep_checkpoints={cfg.keep_checkpoints}"
            )
            return room_problem(Path(cfg.output_dir), n * one, free, what)

        answer = [problem(ahead if cfg.keep_checkpoints else min(ahead, 1))]
        if not answer[0] and (warning := problem(ahead)):
            logger.warning(warning)
    if dist.is_initialized():
        dist.broadcast_object_list(answer, src=0)
    if answer[0]:
        raise RunError(answer[0], all_ranks=True)
