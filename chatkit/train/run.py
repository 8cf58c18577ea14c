"""A training run from a config: join the process group, build the run context, pick the engine, load
the data, and hand all of it to the one loop. `training/train.py` is its command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chatkit.config import TrainConfig
from chatkit.train.context import Run, make_run
from chatkit.train.data import load_data
from chatkit.train.distributed import init_distributed, setup_logging
from chatkit.train.engine import Engine
from chatkit.train.loop import fit, total_steps


def make_engine(run: Run) -> Engine:
    """The pipeline engine when the recipe asks for stages, else ZeRO (stage from the preset)."""
    if run.cfg.pipeline_stages > 1:
        from chatkit.train.pipeline import PipelineEngine

        return PipelineEngine(run)
    from chatkit.train.zero import ZeroEngine

    return ZeroEngine(run)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run `cfg` to the end on this process's rank; returns the last logged metrics."""
    rank, world, device = init_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, rank, "loguru" in cfg.train_log_backend)
    torch.manual_seed(cfg.seed)
    run = make_run(cfg, rank, world, device)
    engine = make_engine(run)
    batches, val_sets = load_data(run, engine.dp_rank, engine.dp_world)
    engine.setup(total_steps(run, batches)[0])
    return fit(run, engine, batches, val_sets)
