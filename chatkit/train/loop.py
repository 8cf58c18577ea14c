"""The training loop: one function, `fit`, for every engine and every training method.

It reads top to bottom: resume, check there is room for the checkpoints, announce the run, then per
step draw the micro-batches, count what the loss is normalised by (over all replicas), step the
engine, log, stop with a checkpoint if any rank was asked to (preemption), evaluate and checkpoint when
due; at the end evaluate, save and write the final metrics. Engines (chatkit.train.engine) hide how a
step runs; methods (chatkit.train.method) hide what the loss is.
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Iterator
from typing import Any

from loguru import logger
from tqdm import tqdm

from chatkit.config import save_config
from chatkit.data import Batches, TokenizedSet
from chatkit.io import write_json
from chatkit.train import checkpoint, preemption, watchdog
from chatkit.train.context import Run, RunError
from chatkit.train.engine import Batch, Engine
from chatkit.train.loss import real_tokens
from chatkit.train.monitor import Monitor
from chatkit.train.preflight import check_disk_room


def total_steps(run: Run, batches: Batches) -> tuple[int, int]:
    """(optimizer steps of the run, steps per epoch): max_steps, or epochs over the data."""
    cfg = run.cfg
    per_epoch = batches.steps_per_epoch(cfg.gradient_accumulation_steps)
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch)), per_epoch


def resume(run: Run, engine: Engine) -> int:
    """The step to continue after: the newest complete checkpoint's (resume=auto or a path), else 0."""
    found = checkpoint.choose_resume(run.cfg, run.rank, engine.dp_world)
    if not found:
        return 0
    start = engine.resume(*found)
    if run.main:
        logger.info(f"resumed from {found[0] / found[1]} at step {start}")
    return start


def announce(run: Run, engine: Engine, batches: Batches, steps: int) -> None:
    """Save the resolved config and log what this run is, in one line (rank 0)."""
    if not run.main:
        return
    cfg = run.cfg
    save_config(cfg, run.out / "train_config.yaml")
    layout, n_params = engine.describe()
    rows = cfg.micro_batch_size * engine.dp_world * cfg.gradient_accumulation_steps
    logger.info(
        f"{sum(len(t) for t in batches.sets)} {'preference pairs' if run.method.pairs else 'conversations'}, "
        f"{'packed ' if cfg.pack else ''}rows of "
        f"{cfg.max_length}, {layout}, {rows} rows per step, {steps} steps, {n_params:,} parameters, "
        f"deepspeed={cfg.deepspeed}, {cfg.precision}"
    )


def evaluate(
    run: Run, engine: Engine, val_sets: list[TokenizedSet], step: int, monitor: Monitor
) -> dict[str, float]:
    """Validation loss and perplexity, and sample replies to the recipe's eval_prompts, logged."""
    row: dict[str, float] = {}
    if val_sets:
        result = engine.evaluate(val_sets)
        row = {f"val_{k}": v for k, v in result.items()}
        if not run.method.pairs:
            row["val_ppl"] = math.exp(min(row["val_loss"], 50))
        if run.main:
            logger.info(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if run.cfg.eval_prompts:
        replies = engine.sample(run.cfg.eval_prompts)
        if run.main:
            for prompt, reply in zip(run.cfg.eval_prompts, replies, strict=True):
                logger.info(f"sample step {step} | {prompt!r} -> {reply!r}")
            monitor.write({"step": step, "samples": dict(zip(run.cfg.eval_prompts, replies, strict=True))})
    if row:
        monitor.write({"step": step, **row})
    return row


def finished(run: Run, steps: int) -> dict[str, Any]:
    """A run re-launched after its last step: nothing to train, and its final checkpoint is not
    written again (re-saving the folder `latest` names is the one save that could lose it)."""
    if run.main:
        logger.info(f"the run already ended at step {steps}: nothing to do (checkpoints in {run.out})")
    path = run.out / "final_metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def draw(stream: Iterator[tuple[int, Batch]], accumulation: int) -> tuple[int, list[Batch]]:
    """The step's micro-batches and the epoch the last of them belongs to."""
    micro = [next(stream) for _ in range(accumulation)]
    return micro[-1][0], [b for _, b in micro]


def fit(run: Run, engine: Engine, batches: Batches, val_sets: list[TokenizedSet]) -> dict[str, Any]:
    """Train to the end of the schedule; returns the last logged metrics (loss, val_loss, ...)."""
    cfg, gas = run.cfg, run.cfg.gradient_accumulation_steps
    steps, per_epoch = total_steps(run, batches)
    start = resume(run, engine)
    if start >= steps:
        return finished(run, steps)
    check_disk_room(cfg, engine, run.rank, start, steps)
    announce(run, engine, batches, steps)
    stream = batches.stream(skip=start * gas, accumulation=gas)
    monitor = Monitor(cfg, run.out, run.main, after=start)
    bar = tqdm(total=steps, initial=start, desc="train", disable=not run.main, dynamic_ncols=True)
    last: dict[str, Any] = {}
    epoch = 0
    for step in range(start + 1, steps + 1):
        watchdog.at(f"step {step}")
        epoch, micro = draw(stream, gas)
        watchdog.stall_for_tests(step, run.rank)
        count, tokens = engine.dp_sum(
            [sum(run.method.count(b) for b in micro), sum(real_tokens(b) for b in micro)]
        )
        result = engine.train_step(micro, count)
        loss = result["loss"]
        if not math.isfinite(loss):  # the same value on every rank: all stop here, nothing is saved
            raise RunError(
                f"the loss is {loss} at step {step}: stopping without saving (checkpoints so far are kept); "
                "lower learning_rate or look at the data",
                all_ranks=True,
            )
        checkpoint._fault("step", step)
        monitor.count_tokens(tokens)
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps:
            last = monitor.log_step(step, steps, per_epoch, result, engine.lr())
        if step != steps and (signum := preemption.agreed_stop(run.device)):
            bar.close()
            return stop_early(run, engine, monitor, step, epoch, signum, last)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
            watchdog.at(f"evaluating at step {step}")
            last.update(evaluate(run, engine, val_sets, step, monitor))
        if cfg.save_every and step % cfg.save_every == 0 and step != steps:
            watchdog.at(f"saving step {step}")
            engine.save(step, epoch)
    bar.close()
    watchdog.at("the final evaluation and save")
    last.update(evaluate(run, engine, val_sets, steps, monitor))
    path = engine.save(steps, epoch)
    if run.main:
        logger.info(f"saved checkpoint {path}")
        write_json(run.out / "final_metrics.json", last)
    monitor.close()
    return last


def stop_early(
    run: Run, engine: Engine, monitor: Monitor, step: int, epoch: int, signum: int, last: dict[str, Any]
) -> dict[str, Any]:
    """Every rank agreed on a preemption signal after `step`: save it (atomically, as any checkpoint),
    tell the launcher, and return without the end-of-run evaluation (the grace period is short)."""
    name = signal.Signals(signum).name
    if run.main:
        logger.info(f"{name}: stopping after step {step} (preemption): saving a checkpoint")
    watchdog.at(f"saving step {step} after {name}")
    path = engine.save(step, epoch)
    preemption.report_stopped(step, path, signum)
    if run.main:
        logger.info(f"saved checkpoint {path}; the same command with resume=auto continues the run")
    monitor.close()
    return last
