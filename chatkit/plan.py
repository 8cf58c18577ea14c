"""What a run will take, from the resolved config and the model registry alone (no weights, no data).

`chatkit.launch --dry-run` prints it: world size, pipeline x data parallelism, global batch, tokens
per step, precision, ZeRO stage, adapters, the parameters that train, and an estimate of the memory
each GPU needs for the weights, the gradients and the Adam states (activations are not estimated).

LoRA targets are decided as training decides them (`chatkit.architectures.resolve_lora_targets`), and
counted with the family's record (`Architecture.lora_params`, r x (in + out) per adapted module, as PEFT
builds them): the count printed is the count of `requires_grad` parameters training will report.

The estimate is the ZeRO paper's (Rajbhandari et al., 2020): per trained parameter, w bytes of
weights, g of gradients and o of optimizer states: bf16/fp16 training keeps 2 + 2 + 12 (fp32
master copy, Adam m and v), fp32 training 4 + 4 + 8; 8-bit AdamW stores m and v in 1 byte each.
Stage 1 shards o over the data-parallel ranks, stage 2 also g, stage 3 also w; offload moves o (and,
for zero3_offload, w) to CPU memory. A pipeline stage holds 1/stages of the model. A frozen LoRA
base costs its weights only: 0.5 bytes a parameter in 4-bit NF4, 1 in 8-bit, else w.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatkit.architectures import ARCHITECTURES, get_architecture, resolve_lora_targets
from chatkit.config import TrainConfig, preset_path
from chatkit.models import ModelSpec, spec_for_path

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


@dataclass(frozen=True)
class World:
    ranks: int
    nodes: int
    per_node: int
    gpu: bool


def ds_preset(name: str) -> dict:
    """The DeepSpeed preset a recipe names (dsconfig/<name>.json or a path); {} when there is none."""
    path = preset_path(name)
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def base_config(model: str) -> dict[str, Any] | None:
    """A recipe's base as a Hugging Face config (with `model_type`): its registry entry's shape, else its
    folder's config.json (a base not in the registry); None when neither is there."""
    spec = spec_for_path(model)
    if spec is not None:
        return {"model_type": spec.architecture, **spec.config}
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("model_type"), str) else None


def nominal_params(spec: ModelSpec) -> int:
    """The card's parameter count, or the record's count from the entry's shape (the tiny models)."""
    return spec.params or get_architecture(spec.architecture).nominal_params(spec.config)


def trainable_params(cfg: TrainConfig, config: dict[str, Any]) -> tuple[int, list[str]]:
    """LoRA parameters training will make trainable on a base of `config`, and the targets among
    `resolve_lora_targets`'s that the count leaves out (no linear module of a decoder layer has that name)."""
    arch = get_architecture(config["model_type"])
    targets = resolve_lora_targets(cfg, arch.model_type)
    shapes = arch.linear_shapes(config)
    known = [t for t in targets if t in shapes]
    unknown = [t for t in targets if t not in shapes]
    return (arch.lora_params(config, cfg.lora_r, known) if known else 0), unknown


def _countable(config: dict[str, Any] | None) -> bool:
    """Whether the records can count `config`'s parameters: a known family, the shape keys there."""
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
    return bool(config) and config["model_type"] in ARCHITECTURES and all(k in config for k in keys)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def memory_per_gpu(cfg: TrainConfig, params: int, trainable: int, dp: int) -> tuple[dict[str, float], str]:
    """Bytes per GPU for weights, gradients and optimizer states, and the formula that gave them."""
    zero = ds_preset(cfg.deepspeed).get("zero_optimization", {})
    stage = zero.get("stage", 0)
    w = g = 4 if cfg.precision == "fp32" else 2
    o = (2 if cfg.optim == "adamw8bit" else 8) + (0 if cfg.precision == "fp32" else 4)
    p = cfg.pipeline_stages
    shard_o = dp if stage >= 1 else 1
    shard_g = dp if stage >= 2 else 1
    shard_w = dp if stage >= 3 else 1
    opt_on_gpu = 0 if "offload_optimizer" in zero else 1
    w_on_gpu = 0 if "offload_param" in zero else 1
    if cfg.lora_r:
        base_bytes = {"4bit": 0.5, "8bit": 1.0}.get(cfg.quantize, w)
        weights = params * base_bytes / (shard_w if not cfg.quantize else 1) + trainable * w / shard_w
        formula = (
            f"base {base_bytes:g} B x {_count(params)}{f' / {shard_w} (ZeRO-3)' if shard_w > 1 else ''}"
            f" + LoRA ({w} + {g} + {o} B) x {_count(trainable)}"
        )
    else:
        weights = params * w / (p * shard_w)
        formula = f"({w} + {g} + {o} B) x {_count(params)}{f' / {p} stages' if p > 1 else ''}"
    n = trainable / p
    mem = {"weights": weights * w_on_gpu, "grads": n * g / shard_g, "optimizer": n * o / shard_o * opt_on_gpu}
    if stage:
        formula += f", ZeRO-{stage} over {dp} data-parallel rank(s)"
    if not opt_on_gpu:
        formula += ", optimizer states offloaded to CPU"
    return mem, formula


def plan_lines(cfg: TrainConfig, world: World) -> list[str]:
    spec = spec_for_path(cfg.model)
    stages = cfg.pipeline_stages
    dp = max(1, world.ranks // stages)
    where = (
        f"{world.per_node} GPU(s) x {world.nodes} node(s)" if world.gpu else f"{world.per_node} CPU rank(s)"
    )
    if not world.gpu and world.nodes > 1:
        where = f"{world.per_node} CPU rank(s) x {world.nodes} node(s)"
    config = base_config(cfg.model)
    model_type = config["model_type"] if config else None
    countable = _countable(config)
    if spec is not None:
        total = nominal_params(spec)
    else:  # a folder's config.json, when it has one of a known family
        total = get_architecture(model_type).nominal_params(config) if countable else None
    if spec is None:
        size = f"about {_count(total)} parameters by its config.json" if total else "size unknown"
        family = f"{model_type}, " if model_type else ""
        lines = [f"model: {cfg.model} ({family}not in chatkit.models: {size}, no memory estimate)"]
    else:
        hub = f"{spec.hf_id}, " if spec.hf_id else ""
        lines = [f"model: {spec.name} ({hub}{spec.architecture}), {_count(total)} parameters"]
        if spec_for_path(str(Path(cfg.model).parent)) is None and Path(cfg.model).name == "hf":
            lines[0] = (
                f"model: {cfg.model}, the export of a {spec.name} run ({spec.architecture}), {_count(total)} parameters"
            )
    lines.append(f"world: {world.ranks} rank(s) = {where}")
    lines.append(f"parallelism: {stages} pipeline stage(s) x {dp} data-parallel")
    if world.ranks % stages:
        lines.append(
            f"warning: pipeline_stages={stages} needs a multiple of {stages} ranks, this launch has {world.ranks}"
            f" (plan for other hardware with --num-gpus N, or set pipeline_stages)"
        )
    gas, micro = cfg.gradient_accumulation_steps, cfg.micro_batch_size
    batch = micro * dp * gas
    lines.append(
        f"global batch: {micro} micro x {dp} DP x {gas} accumulation = {batch} rows of {cfg.max_length}"
    )
    tokens = batch * cfg.max_length
    lines.append(
        f"tokens per step: {batch} x {cfg.max_length} = {tokens:,} at most "
        + ("(packed rows are nearly full)" if cfg.pack else "(one conversation a row: the rest is padding)")
    )
    stage = ds_preset(cfg.deepspeed).get("zero_optimization", {}).get("stage", "?")
    lines.append(
        f"precision: {cfg.precision}; deepspeed: {cfg.deepspeed} (ZeRO stage {stage}); optimizer: {cfg.optim}"
    )
    trainable = total
    if cfg.lora_r:
        kind = f"QLoRA ({cfg.quantize} base)" if cfg.quantize else "LoRA"
        targets = resolve_lora_targets(cfg, model_type)  # what training passes to PEFT
        named = (
            ",".join(targets)
            if isinstance(targets, list)
            else f"{targets} (PEFT's: every linear layer but the head)"
        )
        lines.append(
            f"adapters: {kind} r={cfg.lora_r} alpha={cfg.lora_alpha:g} dropout={cfg.lora_dropout:g} on {named}"
        )
        if countable:
            trainable, unknown = trainable_params(cfg, config)
            if unknown:
                lines.append(
                    f"warning: lora_targets {unknown}: no linear module of a {model_type} decoder layer has that "
                    "name; they are left out of the count (PEFT adapts whatever module of that name it finds, "
                    "and stops when no target matches)"
                )
            lines.append(
                f"trainable: {trainable:,} of {_count(total)} parameters ({100 * trainable / total:.3g}%)"
            )
        else:
            if not model_type:
                why = "the base's family is unknown: not in chatkit.models, no config.json"
            elif model_type not in ARCHITECTURES:
                why = f"chatkit.architectures has no record of {model_type!r}"
            else:
                why = "the base's config.json lacks its shape"
            lines.append(f"trainable: unknown ({why})")
            trainable = None
    else:
        lines.append("adapters: none (every weight trains)")
        lines.append(f"trainable: every weight{f', {_count(total)} parameters' if total else ''}")
    if cfg.max_steps:
        lines.append(
            f"steps: {cfg.max_steps:,} (max_steps) = {_count(cfg.max_steps * tokens)} tokens at most"
        )
    else:
        lines.append(
            f"steps: {cfg.epochs:g} epoch(s); the count depends on the data (see the run's first log line)"
        )
    if spec is not None and trainable is not None:
        mem, formula = memory_per_gpu(cfg, total, trainable, dp)
        parts = " + ".join(f"{k} {_size(v)}" for k, v in mem.items())
        lines.append(
            f"memory per GPU: {_size(sum(mem.values()))} = {parts}; {formula}; activations not included"
        )
    if cfg.method == "dpo":
        lines.append(preference_line(cfg, total if spec is not None else None, dp))
    return lines


def preference_line(cfg: TrainConfig, params: int | None, dp: int) -> str:
    """What preference training adds: for the reference-based losses, one scoring pass before step 1
    and 16 bytes a pair; the memory a second, frozen reference model would take is not spent."""
    head = f"method: dpo, {cfg.preference_loss} loss, beta={cfg.beta:g}; rows hold whole pairs (chosen + rejected)"
    if cfg.preference_loss in ("simpo", "orpo"):
        return f"{head}; reference-free: no reference pass"
    stage = ds_preset(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0)
    saved = ""
    if params:
        frozen = params * {"4bit": 0.5, "8bit": 1.0}.get(cfg.quantize, 4 if cfg.precision == "fp32" else 2)
        shard = dp if stage == 3 and not cfg.quantize else 1
        saved = f" (a frozen reference model would add {_size(frozen / shard)} per GPU)"
    return (
        f"{head}; reference: the starting model scores every pair once before step 1 (about a third of "
        f"an epoch's compute), kept as 16 bytes a pair and cached; memory per GPU above includes it: "
        f"no second model{saved}"
    )
