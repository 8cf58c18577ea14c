"""Pipeline checkpoints -> Hugging Face names.

DeepSpeed saves pipeline layer i as `layer_{i:02d}-model_states.pt` holding the state dict of that
layer's wrapper (chatkit.train.pipeline_model): 0 the embedding, 1..L the decoder layers, L+1 the final
norm, L+2 the head. `hf_key` maps those keys back to Hugging Face names with the family's record
(chatkit.architectures); the tag folder holds the model's config.json. Any number of stages: the files
are per layer, not per stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatkit.architectures import get_architecture
from chatkit.convert.weights import OneFileCache, TensorRef, torch_load_safe


def hf_key(config, layer_idx: int, key: str) -> str | None:
    """HF state-dict name of `key` in pipeline layer `layer_idx`'s file; None for non-weights.

    0: embed.weight -> {base}.{embed}.weight; 1..L: layer.* -> {base}.layers.{i-1}.*;
    L+1: norm.* -> {base}.{norm}.*; L+2: head.weight -> {head}.weight.
    """
    names = get_architecture(config.model_type)
    n = config.num_hidden_layers
    part, _, rest = key.partition(".")
    if part in ("rotary", "dropout"):
        return None
    if layer_idx == 0 and part == "embed":
        return f"{names.base}.{names.embed}.{rest}"
    if 1 <= layer_idx <= n and part == "layer":
        return f"{names.base}.layers.{layer_idx - 1}.{rest}"
    if layer_idx == n + 1 and part == "norm":
        return f"{names.base}.{names.norm}.{rest}"
    if layer_idx == n + 2 and part == "head":
        return f"{names.head}.{rest}"
    raise ValueError(f"unexpected key {key!r} in pipeline layer {layer_idx} ({n} decoder layers)")


def hf_param_name(config, name: str) -> str | None:
    """HF name of a PipelineModule parameter: `{layer}.{key}` (DeepSpeed names each layer by its index
    in the whole model, whatever the stage) or `tied_modules.embed.{key}` (a tied embedding, held by
    the first and the last stage alike)."""
    if name.startswith("tied_modules."):
        return hf_key(config, 0, name.split(".", 2)[2])
    idx, _, key = name.partition(".")
    return hf_key(config, int(idx), key)


def _layer_files(tag_dir: Path) -> list[tuple[int, Path]]:
    files = sorted(tag_dir.glob("layer_*-model_states.pt"))  # also layer_XX-model_YY-model_states.pt
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no layer_XX-model_states.pt files (not a pipeline checkpoint)")
    return [(int(f.name.split("-")[0].removeprefix("layer_")), f) for f in files]


def pipeline_refs(tag_dir: str | Path):
    """Refs (Hugging Face names, fp32) to the weights of a pipeline checkpoint's per-layer files, and a
    hook that drops the one cached file. Any number of stages: the files are per layer, not per stage.

    The tag directory must hold the model's config.json (the pipeline trainer writes it there). With
    tied embeddings the head has no file of its own (and the export leaves it out, as transformers does).
    """
    from transformers import AutoConfig

    tag_dir = Path(tag_dir)
    config = AutoConfig.from_pretrained(tag_dir)
    cache = OneFileCache()
    refs = []
    for idx, f in _layer_files(tag_dir):
        for key, value in cache.get(f, torch_load_safe).items():
            name = hf_key(config, idx, key)
            if name is None:
                continue

            def load(f=f, key=key) -> torch.Tensor:
                return cache.get(f, torch_load_safe)[key].float()

            refs.append(TensorRef(name, tuple(value.shape), torch.float32, load))
    cache.clear()
    return refs, cache.clear


def tie_head(tag_dir: str | Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the head weight (the embedding's) to a tied model's state dict."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tag_dir)
    names = get_architecture(config.model_type)
    if getattr(config, "tie_word_embeddings", False):
        weights[f"{names.head}.weight"] = weights[f"{names.base}.{names.embed}.weight"]
    return weights


def pipeline_state_to_hf(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """HF-named fp32 state dict of a pipeline checkpoint, tied head included (small models, tests)."""
    refs, release = pipeline_refs(tag_dir)
    weights = {r.name: r.load() for r in refs}
    release()
    return tie_head(tag_dir, weights)
