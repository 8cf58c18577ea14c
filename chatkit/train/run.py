"""A training run from a config: join the process group, build the run context, pick the engine, load
the data, and hand all of it to the one loop. `training/train.py` is its command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from chatkit.config import TrainConfig
from chatkit.train import preemption, watchdog
from chatkit.train.context import Run, RunError, make_run
from chatkit.train.data import load_data
from chatkit.train.distributed import init_distributed, launcher_rank_env, setup_logging
from chatkit.train.engine import Engine
from chatkit.train.loop import fit, total_steps
from chatkit.train.preflight import check_same_run


def make_engine(run: Run) -> Engine:
    """The pipeline engine when the recipe asks for stages, else ZeRO (stage from the preset)."""
    if run.cfg.pipeline_stages > 1:
        from chatkit.train.pipeline import PipelineEngine

        return PipelineEngine(run)
    from chatkit.train.zero import ZeroEngine

    return ZeroEngine(run)


_HELD: list = []  # the open lock file: the lock lasts as long as this process


def _take_lock(out: Path) -> str | None:
    """Lock `out` for this run (rank 0); None, or why not. The kernel releases an flock when its
    process dies, so a killed run's successor takes the folder over without anyone deleting a file."""
    import fcntl
    import os
    import socket

    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        f = (out / ".chatkit-run.lock").open("a+", encoding="utf-8")
    except OSError as e:  # read-only or missing permissions: say so now, not at the first save
        return f"output_dir {out} is not writable: {e.strerror or e}"
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "unknown"
        f.close()
        return (
            f"output_dir {out} is in use by another run ({who}); two runs in one folder would overwrite each "
            "other's checkpoints and metrics: wait for it, stop it, or choose another output_dir"
        )
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD.append(f)
    return None


def hold_output_dir(out: Path, rank: int) -> None:
    """Rank 0 locks the output folder before anything is written there; every rank stops if it cannot."""
    import torch.distributed as dist

    answer = [_take_lock(out) if rank == 0 else None]
    dist.broadcast_object_list(answer, src=0)
    if answer[0]:
        raise RunError(answer[0], all_ranks=True)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run `cfg` to the end on this process's rank (or until a preemption signal: chatkit.train.preemption);
    returns the last logged metrics.

    Before any work: the collective backend answers (init_distributed), every rank runs the same code
    and config (chatkit.train.preflight), and from then on a collective that waits past
    collective_timeout_s ends the run with every rank's stack (chatkit.train.watchdog)."""
    os.environ.update(launcher_rank_env())  # srun's and mpirun's ranks name themselves, as DeepSpeed's do
    preemption.listen()  # then: from here on a SIGTERM asks for a checkpoint instead of killing
    rank, world, device = init_distributed(cfg.collective_timeout_s)
    out = Path(cfg.output_dir)
    watchdog.start(cfg.collective_timeout_s, rank, world, out)
    hold_output_dir(out, rank)
    setup_logging(out, rank, "loguru" in cfg.train_log_backend)
    check_same_run(cfg, rank, world)
    torch.manual_seed(cfg.seed)
    run = make_run(cfg, rank, world, device)
    engine = make_engine(run)
    batches, val_sets = load_data(run, engine.dp_rank, engine.dp_world)
    steps = total_steps(run, batches)[0]
    engine.setup(steps)
    if run.method.reference is not None:  # before resuming: the reference is the starting model
        from chatkit.train import reference

        used = reference.used_pairs(batches, steps, cfg.gradient_accumulation_steps)
        reference.attach(run, engine, [*batches.sets, *val_sets], [*used, *[None] * len(val_sets)])
    return fit(run, engine, batches, val_sets)
