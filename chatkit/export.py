"""DeepSpeed checkpoint -> Hugging Face folder (safetensors, config, tokenizer with chat_template,
generation_config with the right eos).

Checkpoint files are read with `torch.load(weights_only=True)`; the only non-tensor classes DeepSpeed
pickles into them (a stage enum and a loss-scaler record) are allow-listed by name, so no code from a
checkpoint ever runs. ZeRO-3 partitions are merged back into full fp32 tensors the way DeepSpeed's
own `zero_to_fp32` does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from chatkit.io import atomic_dir, write_json


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def safe_load(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def resolve_tag_dir(checkpoint: str | Path) -> Path:
    """Accept a checkpoints root (uses its `latest` tag) or a tag directory itself."""
    path = Path(checkpoint)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir() or not list(path.glob("*model_states.pt")):
        raise FileNotFoundError(f"{checkpoint}: not a DeepSpeed checkpoint (no *model_states.pt files)")
    return path


def _rank_files(tag_dir: Path, pattern: str) -> list[Path]:
    files = list(tag_dir.glob(pattern))
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _merge_zero3(tag_dir: Path, model_states: dict[str, Any]) -> dict[str, torch.Tensor]:
    optim_files = _rank_files(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")
    world = len(optim_files)
    if world != model_states["dp_world_size"]:
        raise ValueError(
            f"{tag_dir}: expected {model_states['dp_world_size']} optimizer partitions, found {world}"
        )
    # Each rank holds, for every parameter in order, a slice of ceil(numel / world) elements.
    flats = [torch.cat(safe_load(f)["optimizer_state_dict"]["fp32_flat_groups"]) for f in optim_files]
    shapes: dict[str, torch.Size] = {}
    for group in model_states["param_shapes"]:
        shapes.update(group)
    state, offset = {}, 0
    for name, shape in shapes.items():
        numel = shape.numel()
        part = -(-numel // world)
        full = torch.cat([flat.narrow(0, offset, part) for flat in flats])
        state[name] = full.narrow(0, 0, numel).view(shape).clone()
        offset += part
    if offset != flats[0].numel():
        logger.debug(
            f"merged {offset} of {flats[0].numel()} elements per partition (rest is alignment padding)"
        )
    return state


def load_deepspeed_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a DeepSpeed checkpoint: pipeline stages (per-layer files), ZeRO stage 3
    partitions, or stages 0-2 from the module."""
    tag_dir = resolve_tag_dir(checkpoint)
    if list(tag_dir.glob("layer_*-model_states.pt")):
        from chatkit.pipeline import pipeline_state_to_hf

        return pipeline_state_to_hf(tag_dir)
    model_files = _rank_files(tag_dir, "*model_states.pt")
    states = safe_load(model_files[0])
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        weights = _merge_zero3(tag_dir, states)
    else:
        weights = {k: v.float() for k, v in states["module"].items()}
    for name, shared in states.get("shared_params", {}).items():
        weights[name] = weights[shared]
    return weights


def export_hf(
    checkpoint: str | Path, out: str | Path, dtype: str = "fp32", template: str | None = None
) -> Path:
    """Write a Hugging Face folder that `from_pretrained` and `apply_chat_template` use as they are."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from chatkit.templates import get_template
    from chatkit.trainer_meta import read_meta

    tag_dir = resolve_tag_dir(checkpoint)
    meta = read_meta(tag_dir)
    template_name = template or meta["template"]
    config = AutoConfig.from_pretrained(tag_dir)
    tokenizer = AutoTokenizer.from_pretrained(tag_dir)
    tokenizer.chat_template = get_template(template_name, tokenizer).chat_template
    weights = load_deepspeed_weights(tag_dir)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise ValueError(
            f"{tag_dir}: weights do not fit the config: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model = model.to(torch_dtype)
    _materialize_buffers(model, config)
    gen = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        write_json(tmp / "chatkit.json", {**meta, "template": template_name, "dtype": dtype})
    return Path(out)


def _materialize_buffers(model, config) -> None:
    """Non-persistent buffers (e.g. rotary frequencies) are not in checkpoints: rebuild them on CPU."""
    from transformers import AutoModelForCausalLM

    if not any(b.is_meta for b in model.buffers()):
        return
    fresh = AutoModelForCausalLM.from_config(config)
    fresh_buffers = dict(fresh.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = fresh_buffers[name]
