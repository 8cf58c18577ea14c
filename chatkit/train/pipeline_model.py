"""A Hugging Face causal LM (GPT-NeoX or Llama) as a DeepSpeed `PipelineModule`, and back.

The pipeline is a flat list of layers, each taking and returning a tuple of tensors:

    index 0        EmbeddingPipe   (input_ids, position_ids, segment_ids) -> (hidden, position_ids, segment_ids)
    index 1..L     DecoderPipe     one HF decoder layer each; same tuple in and out
    index L+1      NormPipe        final norm -> hidden
    index L+2      HeadPipe        lm head -> logits (B, T, V); with tied embeddings, the embedding
                                   module again (TiedLayerSpec "embed") used as a projection

Positions and segment ids ride along as integer tensors (the engine sends no gradient for them), so
every decoder layer rebuilds the rotary cos/sin and, from the restarting positions, whatever its
attention implementation needs to keep packed conversations apart (chatkit.train.attention): nothing
for varlen, cumulative lengths for FA2, transformers' own mask for sdpa, eager and flex_attention;
exactly what the non-pipeline trainer's single forward uses.

The layers wrap the modules of an already loaded HF model, so their weights are the base model's.
DeepSpeed saves layer i of a checkpoint as `layer_{i:02d}-model_states.pt` holding that wrapper's
state dict; chatkit.convert.pipeline maps those keys back to Hugging Face names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from chatkit.architectures import get_architecture
from chatkit.train.attention import packed_forward_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


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
    """One HF decoder layer. The rotary module holds no parameters, only its frequency buffers; the
    model's config names the attention implementation (its `_attn_implementation`)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, config: PreTrainedConfig):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.config = config

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, segment_ids = inputs
        # Rebuilt per layer (cheap next to attention) so no mask has to cross stages.
        kwargs = layer_attention_kwargs(self.config, hidden, position_ids)
        cos_sin = self.rotary(hidden, position_ids=position_ids)
        out = self.layer(hidden, position_embeddings=cos_sin, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        return hidden, position_ids, segment_ids


def layer_attention_kwargs(
    config: PreTrainedConfig, hidden: torch.Tensor, position_ids: torch.Tensor
) -> dict[str, Any]:
    """A decoder layer's arguments for packed rows, as the HF model's forward would pass them:
    `packed_forward_kwargs` with `attention_mask` from transformers' `create_causal_mask`, which finds
    the packed sequences from the positions (None for varlen and FA2, which need no mask)."""
    from transformers.masking_utils import create_causal_mask

    kwargs = packed_forward_kwargs(position_ids, config._attn_implementation)
    kwargs["attention_mask"] = create_causal_mask(config, hidden, None, None, position_ids=position_ids)
    return kwargs


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


LossSum = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def scaled_loss(
    loss_sum: LossSum, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The method's summed loss times the micro-batch's scale (chatkit.train.loss.step_scale)."""
    target, scale = labels
    return loss_sum(logits, {"labels": target}) * scale


def layer_specs(model) -> list:
    """LayerSpecs over the modules of a loaded HF causal LM (weights shared, not copied)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    names = get_architecture(model.config.model_type)
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
    specs += [LayerSpec(DecoderPipe, layer, base.rotary_emb, model.config) for layer in base.layers]
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
    loss_sum: LossSum,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
):
    """PipelineModule over `model`'s modules, split over the topology's pipe axis; the last stage
    computes the training method's `loss_sum`.

    dynamic_shape: rows are padded per micro-batch, not to max_length, so activation shapes vary.
    """
    from deepspeed.pipe import PipelineModule

    module = PipelineModule(
        layers=layer_specs(model),
        topology=topology,
        loss_fn=functools.partial(scaled_loss, loss_sum),
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
