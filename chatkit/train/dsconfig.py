"""DeepSpeed presets (dsconfig/<name>.json) with their "auto" fields filled, and the learning-rate schedule."""

from __future__ import annotations

import json
import math
from typing import Any

from chatkit.config import TrainConfig, known_presets, preset_path


def resolve_ds_config(cfg: TrainConfig, hidden_size: int) -> dict[str, Any]:
    """Load the named DeepSpeed preset and fill its "auto" fields from the training config."""
    path = preset_path(cfg.deepspeed)
    if path is None:
        raise FileNotFoundError(
            f"deepspeed config {cfg.deepspeed!r} not found; known: {', '.join(known_presets())}"
        )
    ds = json.loads(path.read_text())
    auto = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.grad_clip,
        "lr": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "reduce_bucket_size": hidden_size * hidden_size,
    }

    def fill(node: Any, key: str | None = None, parent: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, k, key) for k, v in node.items()}
        if node != "auto":
            return node
        if key == "enabled" and parent in ("bf16", "fp16"):
            return cfg.precision == parent
        if key not in auto:
            raise ValueError(f'{path}: no value known for "auto" field {key!r}')
        return auto[key]

    return fill(ds)


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up then cosine decay to min_ratio, as a multiplier of the peak rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
