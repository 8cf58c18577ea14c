"""Where training progress goes: the log line per step, metrics.jsonl, loguru's train.log, wandb,
and a PNG of the loss and learning-rate curves at the end. Rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loguru import logger

from chatkit.config import TrainConfig
from chatkit.io import atomic_open

PREFERENCE_SHOWN = ("reward_accuracy", "reward_margin")
"""Statistics of preference training shown on the step line (metrics.jsonl and wandb get them all)."""


class Monitor:
    def __init__(self, cfg: TrainConfig, out: Path, enabled: bool, after: int = 0):
        """`after`: the step a resumed run continues after; rows of later steps (logged by the
        interrupted run after its last checkpoint) are dropped, or the curves would show them twice."""
        self.enabled = enabled
        self.out = out
        if enabled and after:
            keep_rows_up_to(out / "metrics.jsonl", after)
        self.metrics = (out / "metrics.jsonl").open("a", encoding="utf-8") if enabled else None
        self.wandb = None
        self.t_last, self.tokens_since = time.perf_counter(), 0.0
        if enabled and "wandb" in cfg.train_log_backend:
            import dataclasses

            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=str(out))

    def count_tokens(self, n: float) -> None:
        """Real tokens trained since the last logged step, for its tokens/s."""
        self.tokens_since += n

    def log_step(
        self, step: int, total: int, steps_per_epoch: int, result: dict[str, float], lr: float
    ) -> dict[str, float]:
        """The step's metrics row (on every rank, for the caller's `last`), logged on rank 0.
        `result`: the engine's {"loss": ..., and the method's statistics}."""
        now = time.perf_counter()
        row = {
            "step": step,
            "epoch": round(step / max(steps_per_epoch, 1), 4),
            **result,
            "lr": lr,
            "tokens_per_s": self.tokens_since / (now - self.t_last),
        }
        self.t_last, self.tokens_since = now, 0.0
        self.step(row, total)
        return row

    def step(self, m: dict[str, float], total: int) -> None:
        if not self.enabled:
            return
        extra = "".join(f" | {k} {m[k]:.4f}" for k in PREFERENCE_SHOWN if k in m)
        logger.info(
            f"step {m['step']}/{total} | loss {m['loss']:.4f}{extra} | lr {m['lr']:.2e} | "
            f"tok/s {m['tokens_per_s']:,.0f} | epoch {m['epoch']:.2f}"
        )
        self.write(m)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in row.items() if isinstance(v, int | float)}, step=int(row["step"])
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")


def keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the rows of steps after `step`."""
    if not path.is_file():
        return
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    kept = [x for x in lines if json.loads(x).get("step", 0) <= step]
    if len(kept) != len(lines):
        with atomic_open(path) as f:
            f.writelines(x + "\n" for x in kept)


def plot_curves(metrics: Path, png: Path) -> None:
    """Loss (train and validation) and learning rate against step; preference runs add the reward
    accuracy (train and validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return
    accuracy = [(r["step"], r["reward_accuracy"]) for r in rows if "reward_accuracy" in r]
    val_accuracy = [(r["step"], r["val_reward_accuracy"]) for r in rows if "val_reward_accuracy" in r]
    panels = 3 if accuracy else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3 * panels), sharex=True)
    ax_loss, ax_lr = axes[0], axes[-1]
    ax_loss.plot([s for s, _, _ in train], [v for _, v, _ in train], label="train")
    if val:
        ax_loss.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax_loss.set_ylabel("preference loss per pair" if accuracy else "loss per trained token")
    if not accuracy and all(v > 0 for _, v, _ in train):
        ax_loss.set_yscale("log")
    ax_loss.legend()
    if accuracy:
        axes[1].plot(*zip(*accuracy, strict=True), label="train")
        if val_accuracy:
            axes[1].plot(*zip(*val_accuracy, strict=True), "o-", label="validation")
        axes[1].set_ylabel("reward accuracy")
        axes[1].set_ylim(0, 1)
        axes[1].legend()
    ax_lr.plot([s for s, _, _ in train], [lr for _, _, lr in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
