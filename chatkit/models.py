"""Base models: a registry of what the trainer can start from, and the embedded tiny model.

The tiny model (GPT-NeoX architecture, tokenizer trained locally) lets the demo and the tests run
without downloading anything. Real base models join the registry with their hub ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EOS, PAD = "<|endoftext|>", "<|padding|>"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    """transformers `model_type`, e.g. gpt_neox or llama."""
    template: str
    """Chat template fine-tunes of this model use by default."""
    hf_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """Architecture hyper-parameters for models built from scratch."""
    lora_targets: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown base model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


register_model(
    ModelSpec(
        name="tiny",
        architecture="gpt_neox",
        template="openchatkit",
        config=dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=512,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
        lora_targets=("query_key_value", "dense"),
    )
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, extra_tokens: Iterable[str] = ()):
    """A byte-level BPE tokenizer (GPT-NeoX style) trained on `texts`.

    Digits are split one per token, which small models need to learn arithmetic. Returns a
    `PreTrainedTokenizerFast` with eos/bos `<|endoftext|>` and pad `<|padding|>`, as GPT-NeoX has.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *extra_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=PAD
    )


def build_model(spec: ModelSpec, tokenizer, seed: int = 0, **overrides: Any):
    """A randomly initialised model of `spec`'s architecture sized for `tokenizer` (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        spec.architecture,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**spec.config, **overrides},
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def save_base(model, tokenizer, out: str | Path, template: str) -> None:
    """Write a Hugging Face folder (safetensors) atomically, with the chat template it expects."""
    from chatkit.io import atomic_dir, write_json
    from chatkit.templates import get_template

    tokenizer.chat_template = get_template(template, tokenizer).chat_template
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "chatkit.json", {"template": template})
