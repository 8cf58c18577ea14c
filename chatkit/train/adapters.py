"""What gets trained: full weights, LoRA adapters, or LoRA on a 4/8-bit base (QLoRA), and how.

QLoRA follows the bitsandbytes + PEFT recipe: NF4 base with double quantization, LoRA adapters in
the compute dtype, `prepare_model_for_kbit_training`, optionally 8-bit AdamW. Quantized bases train
with ZeRO stages 0-2, not 3: transformers 5 skips `zero.Init` for a quantized model (it builds it on
the meta device and quantizes the whole base on every rank as it loads), so ZeRO-3 could shard it only
after the load, and only with bitsandbytes' 16-bit `bnb_4bit_quant_storage` (PEFT's QLoRA + ZeRO-3
recipe). Every other base loads in the training dtype, partitioned as it loads under ZeRO-3, LoRA or not.
"""

from __future__ import annotations

from typing import Any

import torch
from loguru import logger

from chatkit.architectures import resolve_lora_targets
from chatkit.config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype every path loads the weights in: the recipe's precision (bf16, fp16 or fp32).

    DeepSpeed trains 16-bit weights against an fp32 master copy that it makes itself from the 16-bit
    values, so loading fp32 and letting DeepSpeed cast gives the same numbers at twice the memory."""
    return DTYPES[cfg.precision]


def load_base(cfg: TrainConfig, device: torch.device):
    """The base model in the training dtype with the recipe's attention implementation, quantized with
    bitsandbytes when the recipe asks for it (the modules left unquantized take the training dtype).

    Under ZeRO-3 (an active `HfDeepSpeedConfig`, see chatkit.train.zero.build_engine) transformers
    builds the model inside `deepspeed.zero.Init`: each rank keeps its partition as the weights load."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from chatkit.train.attention import load_kwargs

    kwargs: dict[str, Any] = {"dtype": load_dtype(cfg), **load_kwargs(cfg.attention, device)}
    if cfg.quantize == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=load_dtype(cfg),
        )
    elif cfg.quantize == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if cfg.quantize:
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    return AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)


def numel(p: torch.nn.Parameter) -> int:
    """A parameter's full size, also when ZeRO-3 holds only this rank's partition of it."""
    return getattr(p, "ds_numel", p.numel())


def match_dtype(model, dtype: torch.dtype) -> None:
    """Cast the floating parameters that ZeRO-3 has not partitioned yet (PEFT's new adapters, which it
    keeps in fp32) to `dtype`: DeepSpeed casts every parameter of a model it partitions itself, but
    leaves a model built inside `zero.Init` as it is, and would partition the adapters in fp32."""
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def keep_training_layout(model) -> None:
    """Leave bitsandbytes' 4-bit layers in training mode inside an eval-mode model.

    On CPUs with AVX512-BF16, a 4-bit layer that runs in eval mode without gradients repacks its weight
    into an inference-only layout and never packs it back; the next training step then fails ("a view
    of a leaf Variable that requires grad is being used in an in-place operation"). Their training flag
    changes nothing else (dropout lives in other modules), so evaluation stays deterministic."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.training = True


def enable_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant): transformers' `activation_checkpointing_enable` where it
    has one (5.x, which deprecates `gradient_checkpointing_enable` with a FutureWarning), else the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_adapters(model, cfg: TrainConfig):
    """Gradient checkpointing, k-bit preparation and LoRA as the config says; returns the model to train."""
    if cfg.quantize:
        from peft import prepare_model_for_kbit_training

        # PEFT would enable checkpointing by the deprecated name; non-reentrant, it needs nothing else of it
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = resolve_lora_targets(cfg, model.config.model_type)
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lora)
        trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        total = sum(numel(p) for p in model.parameters())
        logger.info(
            f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {targets}: {trainable:,} of {total:,} parameters train"
        )
    return model


def client_optimizer(cfg: TrainConfig, model, ds_config: dict[str, Any]):
    """bitsandbytes 8-bit AdamW when asked (replacing the DeepSpeed config's optimizer), else None."""
    if cfg.optim != "adamw8bit":
        return None
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage != 0:
        raise ValueError(f"optim=adamw8bit needs ZeRO stage 0 (deepspeed=zero0), not stage {stage}")
    import bitsandbytes as bnb

    params = ds_config.pop("optimizer")["params"]
    return bnb.optim.AdamW8bit(
        [p for p in model.parameters() if p.requires_grad],
        lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"], weight_decay=params["weight_decay"],
    )  # fmt: skip


def check_engine(cfg: TrainConfig, ds_config: dict[str, Any]) -> None:
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if cfg.quantize and stage == 3:
        raise ValueError("a quantized base cannot be partitioned by ZeRO-3: use deepspeed=zero0 or zero2")
