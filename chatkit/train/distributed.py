"""Joining and leaving the process group (gloo on CPU ranks, nccl on GPUs), per-rank logging, and how
much of DeepSpeed's own log a user sees."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

VERBOSE_ENV = "CHATKIT_VERBOSE"
"""Set to 1 (or `chatkit.launch --verbose`): DeepSpeed's launcher and import-time log lines are shown."""
SHARED_DIR_ENV = "CHATKIT_SHARED_OUTPUT_DIR"
"""Set by chatkit.launch on a launch over several nodes: the output folder, which every node must see."""
SHARED_WAIT_S = 30.0
"""How long a node looks for node 0's file: a network file system may show a new file late."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_deepspeed() -> None:
    """DeepSpeed's logger (`deepspeed.utils.logging.logger`, named "DeepSpeed") passes errors only, for
    steps that import DeepSpeed without training (tools/convert_to_hf.py reads its checkpoints): its
    accelerator probe otherwise warns "Setting accelerator to CPU. If you have GPU or other accelerator,
    we were unable to detect it." on every CPU machine. A filter on the logger, set before DeepSpeed is
    imported, outlasts the level DeepSpeed gives it then. With CHATKIT_VERBOSE=1 nothing is filtered."""
    ds_logger = logging.getLogger("DeepSpeed")
    if not verbose() and _errors_only not in ds_logger.filters:
        ds_logger.addFilter(_errors_only)


def setup_logging(output_dir: Path, rank: int, file_log: bool = True) -> None:
    logger.remove()
    if rank != 0:
        logger.add(lambda m: tqdm.write(m, end=""), level="WARNING", format="[rank {extra[rank]}] {message}")
        logger.configure(extra={"rank": rank})
        return
    logger.add(lambda m: tqdm.write(m, end=""), level="INFO", format="{time:HH:mm:ss} | {message}")
    if file_log:  # --train-log-backend loguru, as OpenChatKit
        log = output_dir / "train.log"
        logger.add(log, level="DEBUG", format="{time:YYYY-MM-DD HH:mm:ss} | {level} | {message}")


def skip_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op out of training runs.

    DeepSpeed's CPU backend builds that op at start-up (a JIT compile under a file lock in
    ~/.cache/torch_extensions) only for `inference_all_reduce`, which training never calls; gloo does
    every collective we use. Skipping it removes three failure modes met on CPU machines: a rank killed
    while compiling leaves the lock behind and every later run waits on it forever; each rank maps a
    ~69 MB /dev/shm file that is never unlinked, so repeated runs fill /dev/shm; a rank that cannot
    create its file leaves its peer spinning. `build_shm_op` returning None is DeepSpeed's own path for
    machines where the op is unavailable.
    """
    # by module name: `import deepspeed.comm.torch` would give the `torch` that deepspeed.comm re-exports
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def expand_hostlist(hostlist: str) -> list[str]:
    """The hosts of a Slurm hostlist (`node[01-03,07],gpu5` -> node01 node02 node03 node07 gpu5), in
    order, zero padding kept; several bracket groups in one name (`r[1-2]n[1-2]`) multiply out. What
    `scontrol show hostnames` prints, without scontrol, which a rank's node may lack."""
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        prefix, bracket, rest = name.partition("[")
        if not bracket:
            hosts.append(name)
            continue
        ranges, _, suffix = rest.partition("]")
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [
                prefix + str(i).zfill(len(lo)) + tail
                for i in range(int(lo), int(hi or lo) + 1)
                for tail in expand_hostlist(suffix) or [""]
            ]
    return hosts


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job that names none: one of 15000-34999 from its job id, the same
    on every node, and apart for jobs that share a node."""
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def _slurm_rank_env(env: dict[str, str]) -> dict[str, str]:
    first = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "CROSS_RANK": env.get("SLURM_NODEID", "?"),  # the node, as DeepSpeed's launcher names it
        "MASTER_ADDR": env.get("MASTER_ADDR") or (first[0] if first else "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID", "0"))),
    }


def _mpi_rank_env(env: dict[str, str], rank: str, size: str, local: str, local_size: str) -> dict[str, str]:
    addr = env.get("MASTER_ADDR")
    if not addr and local_size != size:
        from chatkit.train.context import RunError

        raise RunError(
            "MPI ranks on several nodes need MASTER_ADDR, node 0's address (`chatkit.launch --mode mpi` "
            "passes it with -x), or mpi4py for DeepSpeed's own discovery",
            all_ranks=True,
        )
    port = env.get("MASTER_PORT") or "29500"
    return {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": local, "MASTER_ADDR": addr or "127.0.0.1",
            "MASTER_PORT": port}  # fmt: skip


def launcher_rank_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT of a rank started by srun or mpirun,
    read from what they set (the variables torch.distributed's env:// rendezvous reads); {} when RANK is
    set already (DeepSpeed's launcher, torchrun) or neither started this process.

    srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS (SLURM_NTASKS), SLURM_LOCALID; node 0 is the first of the
    step's node list, the port $MASTER_PORT or `slurm_port`. Open MPI: OMPI_COMM_WORLD_RANK, _SIZE,
    _LOCAL_RANK; MPICH/Hydra: PMI_RANK, PMI_SIZE, MPI_LOCALRANKID; node 0 and the port from
    $MASTER_ADDR/$MASTER_PORT (chatkit.launch passes them with -x). Without MASTER_ADDR and with mpi4py
    installed, it is left to DeepSpeed's own MPI discovery (deepspeed.comm.mpi_discovery)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env:
        return {}
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun step, not the batch shell
        return _slurm_rank_env(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        mpi = [env.get(f"OMPI_COMM_WORLD_{k}", "0") for k in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE")]
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        mpi = [
            env["PMI_RANK"],
            env["PMI_SIZE"],
            env.get("MPI_LOCALRANKID", "0"),
            env.get("MPI_LOCALNRANKS", "0"),
        ]
    else:
        return {}
    if not env.get("MASTER_ADDR") and importlib.util.find_spec("mpi4py") is not None:
        return {}  # deepspeed.init_distributed asks MPI itself
    return _mpi_rank_env(env, *mpi)


def process_group_timeout(collective_timeout_s: float) -> timedelta:
    """torch's own collective timeout: DeepSpeed's (DEEPSPEED_TIMEOUT minutes, default 10), raised to
    outlast collective_timeout_s, so that chatkit's watchdog, which reports every rank's stack, fires
    first (torch's timeout raises in one rank, naming no Python line)."""
    from deepspeed.constants import default_pg_timeout

    return max(default_pg_timeout, timedelta(seconds=collective_timeout_s + 60))


def init_distributed(collective_timeout_s: float = 0.0) -> tuple[int, int, torch.device]:
    """Join the process group (gloo on CPU ranks, nccl on GPUs) and check that a first all-reduce
    completes (chatkit.train.preflight.check_backend); returns (rank, world size, device)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from chatkit.train.preflight import BACKEND_CHECK_S, check_backend

    os.environ.update(launcher_rank_env())  # srun's or mpirun's ranks: as DeepSpeed's launcher sets them
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        skip_shm_allreduce()
    timeout = process_group_timeout(collective_timeout_s)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu:
        device = torch.device("cpu")
    else:
        get_accelerator().set_device(local_rank)  # before any collective: nccl's objects go through it
        device = torch.device(get_accelerator().device_name(local_rank))
    check_s = min(BACKEND_CHECK_S, collective_timeout_s or BACKEND_CHECK_S)
    check_backend(dist.get_rank(), dist.get_world_size(), device, check_s)
    if folder := os.environ.get(SHARED_DIR_ENV):
        check_shared_output_dir(folder, dist.get_rank())
    return dist.get_rank(), dist.get_world_size(), device


def check_shared_output_dir(folder: str, rank: int, wait_s: float = SHARED_WAIT_S) -> None:
    """Stop every rank together, with one line, unless `folder` is one folder that every node sees.

    Every rank writes its ZeRO shards into the output folder and rank 0 the `latest` pointer: on folders
    of their own, nodes would each keep part of every checkpoint, and no node could resume or export one.
    The launch cannot check it: each node's launcher starts alone, and a node's launcher could not tell a
    file written by this run's node 0 from one left on its own disk by an earlier run. The ranks can:
    rank 0 writes a file under a fresh random name, sends the name to every rank, and the first rank of
    each node looks for it (up to `wait_s`) and writes a file of its own there (every rank writes to the
    folder). The files are removed. `folder` is each node's own path to it (mount points may differ).
    """
    import torch.distributed as dist

    name = [f".chatkit-shared-{secrets.token_hex(8)}" if rank == 0 else ""]
    problem = None
    if rank == 0:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / name[0]).write_text(name[0])
        except OSError as e:
            problem = f"cannot write there ({e.strerror or e})"
            name[0] = ""  # nothing for the other nodes to look for
    dist.broadcast_object_list(name, src=0)
    if name[0] and rank != 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        problem = _sees(Path(folder) / name[0], wait_s)
    node = os.environ.get("CROSS_RANK", "?")  # DeepSpeed's launcher: the node's --node_rank
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, (node, socket.gethostname(), folder, problem))
    if rank == 0 and name[0]:
        (Path(folder) / name[0]).unlink(missing_ok=True)
    failed = [(n, host, path, why) for n, host, path, why in found if why]
    if failed:
        from chatkit.train.context import RunError

        n, host, path, why = failed[0]
        more = f" (and {len(failed) - 1} more node(s))" if len(failed) > 1 else ""
        raise RunError(
            f"output_dir {found[0][2]} is not one folder shared by every node: node {n} ({host}, {path}) "
            f"{why}{more}; put output_dir on storage that every node mounts",
            all_ranks=True,
        )


def _sees(marker: Path, wait_s: float) -> str | None:
    """None when `marker` (holding its own name) shows up within `wait_s` and its folder takes a file
    from here; else what went wrong."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if marker.read_text() == marker.name:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            return f"does not see the file node 0 wrote there ({marker.name}) after {wait_s:.0f} s"
        time.sleep(0.2)
    probe = marker.with_name(f"{marker.name}-{socket.gethostname()}-{os.getpid()}")
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"sees node 0's file but cannot write there ({e.strerror or e})"
    return None


def shutdown_distributed() -> None:
    """Leave the process group together before exiting.

    Without it, interpreter shutdown tears down gloo's threads in whatever order it likes; a rank then
    sometimes dies with "terminate called without an active exception" (exit 250) after a run that
    finished and saved, and the launcher reports the whole run as failed.
    """
    import torch.distributed as dist

    from chatkit.train import watchdog

    if dist.is_initialized():
        dist.barrier()
        watchdog.stop()  # the group's end (rank 0's store going away) is not a hang
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum over `group` (default: every rank), on `device`: nccl reduces only tensors on the GPU."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()
