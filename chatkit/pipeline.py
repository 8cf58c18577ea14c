"""A Hugging Face causal LM (GPT-NeoX or Llama) as a DeepSpeed `PipelineModule`, and back.

The pipeline is a flat list of layers, each taking and returning a tuple of tensors:

    index 0        EmbeddingPipe   (input_ids, position_ids, segment_ids) -> (hidden, position_ids, segment_ids)
    index 1..L     DecoderPipe     one HF decoder layer each; same tuple in and out
    index L+1      NormPipe        final norm -> hidden
    index L+2      HeadPipe        lm head -> logits (B, T, V); with tied embeddings, the embedding
                                   module again (TiedLayerSpec "embed") used as a projection

Positions and segment ids ride along as integer tensors (the engine sends no gradient for them), so
every decoder layer rebuilds the rotary cos/sin and the block-diagonal mask exactly as the
non-pipeline trainer's single forward does: packed conversations stay isolated.

The layers wrap the modules of an already loaded HF model, so their weights are the base model's.
DeepSpeed saves layer i of a checkpoint as `layer_{i:02d}-model_states.pt` holding that wrapper's
state dict; `hf_key` maps those keys back to Hugging Face names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chatkit.data import block_causal_mask
from chatkit.trainer import token_loss_sum


@dataclass(frozen=True)
class ArchNames:
    """Where a model_type keeps its pieces, as Hugging Face state-dict prefixes."""

    base: str
    embed: str
    norm: str
    head: str
    embed_dropout: str | None = None


ARCHITECTURES: dict[str, ArchNames] = {
    "gpt_neox": ArchNames("gpt_neox", "embed_in", "final_layer_norm", "lm_head", "emb_dropout"),
    "llama": ArchNames("model", "embed_tokens", "norm", "lm_head"),
}


def arch_names(model_type: str) -> ArchNames:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"pipeline parallelism supports {known}; not {model_type!r}") from None


class EmbeddingPipe(nn.Module):
    def __init__(self, embed: nn.Embedding, dropout: nn.Module | None = None):
        super().__init__()
        self.embed = embed
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, segment_ids = inputs
        return self.dropout(self.embed(input_ids)), position_ids, segment_ids  # hidden (B, T, C)


def tied_logits(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The tied output projection: logits = hidden @ E^T, with the embedding module of the tie."""
    return F.linear(hidden, embedding.embed.weight)


class DecoderPipe(nn.Module):
    """One HF decoder layer. The rotary module holds no parameters, only its frequency buffers."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, segment_ids = inputs
        # Rebuilt per layer (cheap next to attention) so no float mask has to cross stages.
        mask = block_causal_mask(segment_ids, hidden.dtype)  # (B, 1, T, T)
        cos_sin = self.rotary(hidden, position_ids=position_ids)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
        return hidden, position_ids, segment_ids


class NormPipe(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.norm(inputs[0])


class HeadPipe(nn.Module):
    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)  # (B, T, V)


def pipeline_loss(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summed token loss times the micro-batch's scale (see trainer_pipeline.step_scale)."""
    target, scale = labels
    return token_loss_sum(logits, target) * scale


def layer_specs(model) -> list:
    """LayerSpecs over the modules of a loaded HF causal LM (weights shared, not copied)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    names = arch_names(model.config.model_type)
    base = getattr(model, names.base)
    embed = getattr(base, names.embed)
    dropout = getattr(base, names.embed_dropout) if names.embed_dropout else None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    first = (
        TiedLayerSpec("embed", EmbeddingPipe, embed, dropout, tied_weight_attr=["embed.weight"])
        if tied
        else LayerSpec(EmbeddingPipe, embed, dropout)
    )
    specs = [first]
    specs += [LayerSpec(DecoderPipe, layer, base.rotary_emb) for layer in base.layers]
    specs.append(LayerSpec(NormPipe, getattr(base, names.norm)))
    if tied:
        specs.append(
            TiedLayerSpec(
                "embed",
                EmbeddingPipe,
                embed,
                dropout,
                forward_fn=tied_logits,
                tied_weight_attr=["embed.weight"],
            )
        )
    else:
        specs.append(LayerSpec(HeadPipe, getattr(model, names.head)))
    return specs


def build_pipeline(
    model,
    topology,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
):
    """PipelineModule over `model`'s modules, split over the topology's pipe axis.

    dynamic_shape: rows are padded per micro-batch, not to max_length, so activation shapes vary.
    """
    from deepspeed.pipe import PipelineModule

    module = PipelineModule(
        layers=layer_specs(model),
        topology=topology,
        loss_fn=pipeline_loss,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["DecoderPipe"],
        dynamic_shape=True,
    )
    _count_every_stage_in_grad_norm(module, topology)
    return module


def _count_every_stage_in_grad_norm(module, topology) -> None:
    """Make fp32 gradient clipping use the norm over all stages.

    DeepSpeed's fp32 `clip_grad_norm_` counts a parameter only on model-parallel rank 0 (for a
    pipeline: stage 0) unless it is marked `model_parallel`; unmarked, the other stages' gradients
    would be left out of the norm. A tied copy off stage 0 stays unmarked so it counts once.
    """
    stage = topology.get_coord(torch.distributed.get_rank()).pipe
    for p in module.parameters():
        p.model_parallel = True
    if stage != 0:
        for p in module.tied_modules.parameters():
            p.model_parallel = False


def pipeline_batch(batch: dict[str, torch.Tensor], scale: float) -> tuple[tuple, tuple]:
    """A collated micro-batch -> the engine's (inputs for stage 0, labels for the last stage)."""
    inputs = (batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    return inputs, (batch["labels"], torch.tensor(scale, dtype=torch.float32))


# ---------------------------------------------------------------- checkpoint -> Hugging Face


def hf_key(config, layer_idx: int, key: str) -> str | None:
    """HF state-dict name of `key` in pipeline layer `layer_idx`'s file; None for non-weights.

    0: embed.weight -> {base}.{embed}.weight; 1..L: layer.* -> {base}.layers.{i-1}.*;
    L+1: norm.* -> {base}.{norm}.*; L+2: head.weight -> {head}.weight.
    """
    names = arch_names(config.model_type)
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

    from chatkit.weights import OneFileCache, TensorRef, torch_load_safe

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
    names = arch_names(config.model_type)
    if getattr(config, "tie_word_embeddings", False):
        weights[f"{names.head}.weight"] = weights[f"{names.base}.{names.embed}.weight"]
    return weights


def pipeline_state_to_hf(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """HF-named fp32 state dict of a pipeline checkpoint, tied head included (small models, tests)."""
    refs, release = pipeline_refs(tag_dir)
    weights = {r.name: r.load() for r in refs}
    release()
    return tie_head(tag_dir, weights)
