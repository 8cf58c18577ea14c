"""Every DeepSpeed checkpoint layout as lazily read weights: ZeRO stages 0-2 (the module as saved), ZeRO-3
partitions (merged back into full fp32 tensors the way DeepSpeed's own `zero_to_fp32` does) and pipeline
stages (per-layer files; chatkit.convert.pipeline). Files are read with chatkit.convert.safe.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chatkit.convert.safe import load_weights_only
from chatkit.convert.weights import OneFileCache, TensorRef


def safe_load(path: Path) -> dict[str, Any]:
    return load_weights_only(path, mmap=True)


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


def _narrow_groups(groups: list[torch.Tensor], offset: int, length: int) -> torch.Tensor:
    """`torch.cat(groups).narrow(0, offset, length)` without concatenating (copying) the groups."""
    pieces = []
    for g in groups:
        n = g.numel()
        if offset < n and length > 0:
            take = min(n - offset, length)
            pieces.append(g.narrow(0, offset, take))
            length -= take
        offset = max(0, offset - n)
    return torch.cat(pieces) if len(pieces) != 1 else pieces[0]


class _RankFlats:
    """Every rank's fp32 flat partitions, mmapped while one output shard is written, then released."""

    def __init__(self, files: list[Path]) -> None:
        self.files, self.flats = files, None

    def get(self) -> list[list[torch.Tensor]]:
        if self.flats is None:
            self.flats = [safe_load(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in self.files]
        return self.flats

    def clear(self) -> None:
        self.flats = None


def _zero3_refs(tag_dir: Path, model_states: dict[str, Any]) -> tuple[list[TensorRef], Callable[[], None]]:
    """Refs to full fp32 tensors merged from ZeRO-3 partitions, as DeepSpeed's `zero_to_fp32` merges them."""
    optim_files = _rank_files(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")
    world = len(optim_files)
    if world != model_states["dp_world_size"]:
        raise ValueError(
            f"{tag_dir}: expected {model_states['dp_world_size']} optimizer partitions, found {world}"
        )
    flats = _RankFlats(optim_files)
    shapes: dict[str, torch.Size] = {}
    for group in model_states["param_shapes"]:
        shapes.update(group)
    refs, offset = [], 0
    # Each rank holds, for every parameter in order, a slice of ceil(numel / world) elements.
    for name, shape in shapes.items():
        numel = shape.numel()
        part = -(-numel // world)

        def load(offset=offset, part=part, numel=numel, shape=shape) -> torch.Tensor:
            full = torch.cat([_narrow_groups(groups, offset, part) for groups in flats.get()])
            return full.narrow(0, 0, numel).view(shape).clone()

        refs.append(TensorRef(name, tuple(shape), torch.float32, load))
        offset += part
    return refs, flats.clear


def checkpoint_refs(checkpoint: str | Path) -> tuple[list[TensorRef], Callable[[], None]]:
    """Refs to the weights of a DeepSpeed checkpoint, read lazily, and a hook that frees cached files.

    Pipeline stages (per-layer files; Hugging Face names), ZeRO-3 partitions (merged in fp32), or
    stages 0-2 (the module as saved). Names shared with another tensor (tied weights) are left out.
    """
    tag_dir = resolve_tag_dir(checkpoint)
    if list(tag_dir.glob("layer_*-model_states.pt")):
        from chatkit.convert.pipeline import pipeline_refs

        return pipeline_refs(tag_dir)
    model_files = _rank_files(tag_dir, "*model_states.pt")
    states = safe_load(model_files[0])
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        return _zero3_refs(tag_dir, states)
    cache = OneFileCache()
    shared = states.get("shared_params", {})
    refs = [
        TensorRef(
            k,
            tuple(v.shape),
            torch.float32,
            lambda k=k: cache.get(model_files[0], safe_load)["module"][k].float(),
        )
        for k, v in states["module"].items()
        if k not in shared
    ]
    return refs, cache.clear


def load_deepspeed_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a DeepSpeed checkpoint (tied weights included), for tests and small models."""
    tag_dir = resolve_tag_dir(checkpoint)
    refs, _ = checkpoint_refs(tag_dir)
    weights = {r.name: r.load().float() for r in refs}
    if list(tag_dir.glob("layer_*-model_states.pt")):
        from chatkit.convert.pipeline import tie_head

        return tie_head(tag_dir, weights)
    states = safe_load(_rank_files(tag_dir, "*model_states.pt")[0])
    for name, shared in states.get("shared_params", {}).items():
        weights[name] = weights[shared]
    return weights
