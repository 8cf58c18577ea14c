"""LoRA adapters (PEFT's saved format) merged into a base model's weights, streamed tensor by tensor.

A merged model is a plain Hugging Face folder: it loads without PEFT, serves as fast as the base, and
is what a Koala-style diff or a re-shard starts from. Each base tensor is read, and when an adapter
targets it, `W + scale * (B @ A)` is added in fp32 (PEFT's `merge_and_unload` arithmetic) before it is
cast back to the base's dtype. Only the adapter (small) is held in memory.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from chatkit.convert.weights import TensorRef, WeightsError, safetensors_refs

PREFIX = "base_model.model."


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scales(config: dict, modules: set[str]) -> dict[str, float]:
    scales = {}
    for m in modules:
        r = _pattern_value(config.get("rank_pattern") or {}, m, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, m, config["lora_alpha"])
        scales[m] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return scales


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter tensors) of a PEFT LoRA folder; refuses what a merge cannot express."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise WeightsError(f"{cfg_path}: peft_type {config['peft_type']!r}; only LORA adapters merge")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise WeightsError(f"{cfg_path}: {flag}=true adapters are not supported by this merge")
    files = [adapter_dir / "adapter_model.safetensors"]
    if not files[0].is_file():
        raise WeightsError(f"{adapter_dir}: no adapter_model.safetensors")
    tensors = {r.name: r.load() for r in safetensors_refs(files[0])}
    return config, tensors


def lora_merged_refs(base_refs: list[TensorRef], adapter_dir: str | Path) -> list[TensorRef]:
    """Refs to the base weights with the adapter merged in (same names, shapes and dtypes as the base)."""
    config, tensors = read_adapter(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        if m := re.fullmatch(r"(.+)\.lora_([AB])\.weight", name):
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        else:  # a fully trained module (modules_to_save, bias): its tensor replaces the base's
            replaced[name.replace(".modules_to_save", "")] = t
    base_names = {r.name for r in base_refs}
    unknown = [f"{m}.weight" for m in pairs if f"{m}.weight" not in base_names]
    unknown += [n for n in replaced if n not in base_names]
    if unknown:
        raise WeightsError(f"{adapter_dir}: adapter tensors with no base weight to merge into: {unknown[:5]}")
    half = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if half:
        raise WeightsError(f"{adapter_dir}: lora_A without lora_B (or the reverse) for {half[:5]}")
    scales = _scales(config, set(pairs))
    transpose = bool(config.get("fan_in_fan_out"))
    return [_merged(r, pairs, replaced, scales, transpose) for r in base_refs]


def _merged(ref: TensorRef, pairs, replaced, scales, transpose: bool) -> TensorRef:
    module = ref.name.removesuffix(".weight")
    if ref.name in replaced:
        t = replaced[ref.name]
        if tuple(t.shape) != ref.shape:
            raise WeightsError(f"adapter's {ref.name} has shape {tuple(t.shape)}, the base's {ref.shape}")
        return TensorRef(ref.name, ref.shape, ref.dtype, lambda: t.to(ref.dtype))
    if not ref.name.endswith(".weight") or module not in pairs:
        return ref
    a, b, scale = pairs[module]["A"].float(), pairs[module]["B"].float(), scales[module]
    delta_shape = (b.shape[0], a.shape[1])
    if (delta_shape[::-1] if transpose else delta_shape) != ref.shape:
        raise WeightsError(f"adapter for {module}: B @ A is {delta_shape}, the base weight {ref.shape}")

    def load() -> torch.Tensor:
        delta = (b @ a) * scale
        return (ref.load().float() + (delta.T if transpose else delta)).to(ref.dtype)

    return TensorRef(ref.name, ref.shape, ref.dtype, load)
