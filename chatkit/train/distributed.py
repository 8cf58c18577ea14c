"""Joining and leaving the process group (gloo on CPU ranks, nccl on GPUs), per-rank logging, and how
much of DeepSpeed's own log a user sees."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

VERBOSE_ENV = "CHATKIT_VERBOSE"
"""Set to 1 (or `chatkit.launch --verbose`): DeepSpeed's launcher and import-time log lines are shown."""


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


def init_distributed() -> tuple[int, int, torch.device]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        skip_shm_allreduce()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu:
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    get_accelerator().set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(get_accelerator().device_name(local_rank))


def shutdown_distributed() -> None:
    """Leave the process group together before exiting.

    Without it, interpreter shutdown tears down gloo's threads in whatever order it likes; a rank then
    sometimes dies with "terminate called without an active exception" (exit 250) after a run that
    finished and saved, and the launcher reports the whole run as failed.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum over `group` (default: every rank), on `device`: nccl reduces only tensors on the GPU."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()
