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

The layers wrap the modules of an HF model, so their weights are the base model's. A training rank
builds that model with every parameter on the meta device (`empty_model`: shapes, no memory) and
loads only what its stage holds: DeepSpeed decides which layers a stage builds (its `partition_method`),
then `StageModule` reads exactly those layers' tensors from the checkpoint, one tensor at a time, in
the training dtype. A rank of an 8-stage GPT-NeoX-20B pipeline so holds about 1/8 of the 16-bit
weights at load, where converting the whole fp16 checkpoint to fp32 first held about 80 GB on each of
the 8 ranks. A model already in memory (tests, tools) is wrapped as it is.

DeepSpeed saves layer i of a checkpoint as `layer_{i:02d}-model_states.pt` holding that wrapper's
state dict; chatkit.convert.pipeline maps those keys back to Hugging Face names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from chatkit.architectures import get_architecture
from chatkit.train.attention import packed_forward_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

    from chatkit.convert.weights import TensorRef


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
    if not names.pipeline:
        raise ValueError(
            f"the pipeline engine cannot split a {names.model_type} model (it scales its embeddings and "
            "soft-caps its logits outside the layers a stage holds): use pipeline_stages=1 (ZeRO)"
        )
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


def empty_model(path: str | Path, dtype: torch.dtype, **kwargs: Any):
    """The causal LM of `path`'s config with every parameter on the meta device (its shape and dtype, no
    memory) and its buffers real: the rotary frequencies are computed at construction, exactly as
    `from_pretrained` has them. Nothing is read from the weights files and no random state is used.
    `kwargs`: what `from_pretrained` would be given besides (chatkit.train.attention.load_kwargs)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.tie_weights()  # accelerate re-wraps each parameter it moves to meta, which undoes the tie
    return model


def checkpoint_tensors(model, folder: str | Path) -> dict[str, TensorRef]:
    """The tensors of the Hugging Face folder `folder` by `model`'s parameter names, from the files'
    headers alone (nothing read). Checkpoint names go through transformers' own renaming, as
    `from_pretrained` applies it (GPT-NeoX files name the head `embed_out`, the model `lm_head`; a
    base-model prefix is added or dropped); a checkpoint that needs tensors merged or split (a
    transformers `WeightConverter`) is refused, since one name would not be one tensor."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from chatkit.convert.weights import hf_refs

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()  # meta tensors: names only
    refs = {}
    for ref in hf_refs(folder):
        name, converter = rename_source_key(
            ref.name, renamings, converters, model.base_model_prefix, expected
        )
        if converter is not None:
            raise ValueError(
                f"{folder}: {ref.name} must be converted by transformers ({converter}) before training; "
                "save the model with save_pretrained first"
            )
        refs[name] = ref
    return refs


def load_parameters(modules: Iterable[nn.Module], model, refs: dict[str, TensorRef]) -> None:
    """Give every meta parameter of `modules` its tensor from `refs` (by its name in `model`), cast to
    the dtype it was declared with. One tensor is read at a time; a tensor shared by several modules
    (tied embeddings) is read once and stays shared. Parameters already in memory are left as they are."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    loaded: dict[int, nn.Parameter] = {}
    for module in modules:
        for sub in module.modules():
            for key, p in list(sub._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                if id(p) not in loaded:
                    loaded[id(p)] = _read_parameter(p, names.get(id(p), []), refs)
                sub._parameters[key] = loaded[id(p)]


def _read_parameter(p: nn.Parameter, names: list[str], refs: dict[str, TensorRef]) -> nn.Parameter:
    ref = next((refs[n] for n in names if n in refs), None)
    if ref is None:
        raise ValueError(f"the checkpoint has no tensor for {' / '.join(names) or 'a parameter'}")
    if ref.shape != tuple(p.shape):
        raise ValueError(
            f"{ref.name}: shape {ref.shape} in the checkpoint, the model expects {tuple(p.shape)}"
        )
    return nn.Parameter(ref.load().to(p.dtype), requires_grad=p.requires_grad)


@functools.cache
def _stage_module_class() -> type:
    """`StageModule`, defined on first use: importing DeepSpeed is slow."""
    from deepspeed.pipe import PipelineModule

    class StageModule(PipelineModule):
        """A PipelineModule over layers whose parameters are still on the meta device.

        DeepSpeed partitions the layers and builds this stage's (`_partition_layers`, `_build`); the
        override then loads the parameters of what it built, and only those, before the module moves to
        the rank's device. The partition stays DeepSpeed's own, so which stage holds which layer (and so
        the per-layer checkpoint files) is what it was when the whole model was loaded first."""

        def __init__(self, *args: Any, load_stage: Callable[[nn.Module], None], **kwargs: Any):
            self._load_stage = load_stage  # a plain attribute: set before nn.Module.__init__
            super().__init__(*args, **kwargs)

        def _build(self) -> None:
            super()._build()
            self._load_stage(self)

    return StageModule


def _load_stage(module: nn.Module, model, folder: str | Path) -> None:
    """Load what `module` (one stage) holds from `folder`; then put back on the meta device any module
    of another stage that was in memory (a resized embedding: see chatkit.train.pipeline.load_model),
    which the layer specs would otherwise keep alive."""
    load_parameters([module], model, checkpoint_tensors(model, folder))
    held = {id(p) for p in module.parameters()}
    for spec in module._layer_specs:
        for arg in getattr(spec, "module_args", ()):
            params = list(arg.parameters()) if isinstance(arg, nn.Module) else []
            # parameterless modules (the shared rotary frequencies, dropout) are left alone
            if params and not any(id(p) in held or p.is_meta for p in params):
                arg.to("meta")


def build_pipeline(
    model,
    topology,
    loss_sum: LossSum,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
    weights: str | Path | None = None,
):
    """PipelineModule over `model`'s modules, split over the topology's pipe axis; the last stage
    computes the training method's `loss_sum`.

    `weights`: the Hugging Face folder to read this stage's parameters from, for a model whose
    parameters are on the meta device (`empty_model`); only the stage's own layers are read.

    dynamic_shape: rows are padded per micro-batch, not to max_length, so activation shapes vary.
    """
    from deepspeed.pipe import PipelineModule

    kwargs: dict[str, Any] = dict(
        layers=layer_specs(model),
        topology=topology,
        loss_fn=functools.partial(scaled_loss, loss_sum),
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["DecoderPipe"],
        dynamic_shape=True,
    )
    if any(p.is_meta for p in model.parameters()):
        if weights is None:
            raise ValueError("a model on the meta device needs `weights`, the folder to load its stage from")
        load = functools.partial(_load_stage, model=model, folder=weights)
        module = _stage_module_class()(load_stage=load, **kwargs)
    else:
        module = PipelineModule(**kwargs)
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
