"""Preemption: SIGTERM, or SIGUSR1 ahead of a job's time limit (Slurm: `sbatch --signal=USR1@120`), ends
every rank after the same optimizer step, with a checkpoint, and exit status 0; `resume=auto` goes on.

The ranks (`listen`, `agreed_stop`): the handler only sets a flag, since a signal may land anywhere
(inside a collective, a save, a print). Once per step the flag is all-reduced (MAX) over every rank:
the signal may reach one rank only, or reach ranks at different times, and a rank that stopped alone
would leave the others waiting in their next collective.

The launcher (chatkit.launch, `rank_pids`, `stopped`): it tells the ranks only. DeepSpeed's runner and
per-node launcher must not get the signal: the per-node launcher's SIGTERM handler
(deepspeed/launcher/launch.py, sigkill_handler) terminates its ranks, kills what is left 30 s later and
exits 1 whatever the ranks did, and the runner dies of SIGTERM or SIGUSR1 at once. So each rank writes
its pid into the launch's folder (LAUNCH_DIR_ENV) once its handler is in place, the launcher signals
those pids, and the first rank of each node writes `stopped.json` there once the checkpoint is complete.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

LAUNCH_DIR_ENV = "CHATKIT_LAUNCH_DIR"
"""Set by chatkit.launch: a folder of this node's launch, where ranks register and report a stop."""
GRACE_ENV = "CHATKIT_PREEMPT_GRACE_S"
"""Set by chatkit.launch: preempt_grace_s, the seconds it waits after SIGTERM/SIGUSR1 before killing."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOPPED = "stopped.json"

_requested = 0  # the first preemption signal this process received, 0 for none


def _note(signum: int, frame: Any) -> None:
    global _requested
    _requested = _requested or signum


def listen() -> None:
    """Take SIGTERM and SIGUSR1 as requests to stop after the current step; then register with the
    launch (if any), so that from now on its launcher signals this process."""
    for signum in SIGNALS:
        signal.signal(signum, _note)
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if folder:
        path = Path(folder) / f"rank{os.environ.get('RANK', '0')}.pid"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, path)  # the launcher never reads half a pid


def requested() -> int:
    """The preemption signal this rank received (0: none)."""
    return _requested


def agreed_stop(device: Any) -> int:
    """The largest preemption signal any rank received (0: none): one all-reduce over every rank, on
    `device` (nccl reduces GPU tensors only). The same answer on every rank, so all stop together."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return _requested
    flag = torch.tensor([_requested], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def report_stopped(step: int, checkpoint: Path, signum: int) -> None:
    """Tell this node's launcher that the run saved `checkpoint` after a preemption signal: the first
    rank of each node writes `stopped.json` (called once the save is complete on every rank)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if not folder or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    info = {
        "step": step,
        "checkpoint": str(Path(checkpoint).resolve()),
        "signal": signal.Signals(signum).name,
    }
    tmp = Path(folder) / f"{STOPPED}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, Path(folder) / STOPPED)


# --- the launcher's side ---------------------------------------------------------------------------


def rank_pids(folder: Path) -> list[int]:
    """The pids of the ranks registered in `folder` so far."""
    pids = []
    for path in Path(folder).glob("rank*.pid"):
        try:
            pids.append(int(path.read_text()))
        except (OSError, ValueError):
            continue
    return pids


def stopped(folder: Path | None) -> dict[str, Any] | None:
    """{"step", "checkpoint", "signal"} when the run in `folder` saved and stopped on a preemption signal."""
    if folder is None:
        return None
    try:
        return json.loads((Path(folder) / STOPPED).read_text())
    except (OSError, ValueError):
        return None
