"""Base models: a registry of what the trainer can start from, and the embedded tiny models.

The tiny models (GPT-NeoX, Llama, Mistral, Qwen3 and Gemma 2 architectures, tokenizer trained
locally) let the demo and the tests run without downloading anything. Real base models are registered with their hub ids, their
shape and nominal size: `chatkit.launch --dry-run` plans a run from them without the weights.
A recipe's `model: pretrained/<name>/model` names its registry entry by the folder.
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
    """Hugging Face config values: the whole shape of a model built from scratch; of a real one, the
    values of its config.json that fix the shape of every weight (a model built from them on the meta
    device has the real one's parameters, tensor for tensor), and its context."""
    params: int = 0
    """Nominal parameter count (the model card's), for plans; 0: count from `config`
    (`chatkit.architectures.Architecture.nominal_params`)."""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _lookup(name: str) -> ModelSpec | None:
    """An entry by exact name, else case-insensitively or by a former name: folders made before the
    entries took OpenChatKit's names (`pretrained/pythia-6.9b-deduped/model`) keep working."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    folded = name.casefold()
    folded = _ALIASES.get(folded, folded).casefold()  # the aliases' keys are lower-case
    return next((s for k, s in _REGISTRY.items() if k.casefold() == folded), None)


def get_model_spec(name: str) -> ModelSpec:
    spec = _lookup(name)
    if spec is None:
        raise KeyError(f"unknown base model {name!r}; known: {', '.join(list_models())}")
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY, key=str.casefold)


def spec_for_path(model: str) -> ModelSpec | None:
    """The registry entry a recipe's `model` names: `pretrained/<name>/model`, `<name>`, a hub id, or
    `outputs/<recipe>/hf`, the export of a recipe's run (a DPO recipe starts from one): that recipe's
    base, whose architecture and size it has."""
    path = Path(model)
    for name in (path.parent.name if path.name == "model" else path.name, model):
        if spec := _lookup(name):
            return spec
    hub = model.casefold()  # hub ids are case-insensitive too
    found = next((s for s in _REGISTRY.values() if s.hf_id and s.hf_id.casefold() == hub), None)
    return found or _export_of_recipe(path)


def _export_of_recipe(path: Path) -> ModelSpec | None:
    import yaml

    recipe = Path(__file__).resolve().parents[1] / "config" / f"{path.parent.name}.yaml"
    if path.name != "hf" or path.parent.parent.name != "outputs" or not recipe.is_file():
        return None
    try:
        base = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return spec_for_path(base) if isinstance(base, str) and Path(base) != path else None


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
    )
)

# The same shape as a Llama (RMSNorm, SwiGLU, rotary); same tokenizer as `tiny`.
register_model(
    ModelSpec(
        name="tiny-llama",
        architecture="llama",
        template="openchatkit",
        config=dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=344,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    )
)


# Tiny stand-ins for today's Llama-shaped families (the `--tiny` variants of their architectures): the
# same width as tiny-llama, grouped-query attention as the real ones have, and what sets each family
# apart kept: Qwen3's q/k norms and head_dim, Gemma 2's soft-capping, alternating sliding windows,
# embedding scale and tied head. Llama 3.1 is the `llama` architecture: tiny-llama stands in for it.
_TINY_GQA = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)  # fmt: skip
register_model(
    ModelSpec(
        "tiny-mistral",
        "mistral",
        "mistral",
        config=dict(**_TINY_GQA, intermediate_size=448, sliding_window=None, tie_word_embeddings=False),
    )  # fmt: skip
)
register_model(
    ModelSpec(
        "tiny-qwen3",
        "qwen3",
        "qwen3",
        config=dict(**_TINY_GQA, intermediate_size=384, head_dim=32, tie_word_embeddings=False),
    )  # fmt: skip
)
register_model(
    ModelSpec(
        "tiny-gemma2",
        "gemma2",
        "gemma",
        config=dict(
            **_TINY_GQA,
            intermediate_size=512,
            head_dim=32,
            sliding_window=256,
            query_pre_attn_scalar=32,
            tie_word_embeddings=True,
        ),
    )  # fmt: skip
)


def _real(name: str, arch: str, template: str, hf_id: str, params: int, **config: Any) -> None:
    register_model(ModelSpec(name, arch, template, hf_id, config, params))


# Parameter counts are the model cards' (or the safetensors index's); shapes the config.json of each hub
# repository (https://huggingface.co/<hf_id>/blob/main/config.json), every value that fixes a weight's
# shape: a model built from them has the card's parameter count exactly (tests/test_architectures.py).
# The names are OpenChatKit's `pretrained/<name>` folders; `pretrained/<name>/prepare.py` downloads each.
_real("Pythia-6.9B-deduped", "gpt_neox", "openchatkit", "EleutherAI/pythia-6.9b-deduped", 6_857_302_016,
      # https://huggingface.co/EleutherAI/pythia-6.9b-deduped/blob/main/config.json
      hidden_size=4096, num_hidden_layers=32, intermediate_size=16384, max_position_embeddings=2048,
      num_attention_heads=32, vocab_size=50432, tie_word_embeddings=False)  # fmt: skip
_real("GPT-NeoX-20B", "gpt_neox", "openchatkit", "EleutherAI/gpt-neox-20b", 20_554_567_680,
      # https://huggingface.co/EleutherAI/gpt-neox-20b/blob/main/config.json
      hidden_size=6144, num_hidden_layers=44, intermediate_size=24576, max_position_embeddings=2048,
      num_attention_heads=64, vocab_size=50432, tie_word_embeddings=False)  # fmt: skip
_real("Llama-2-7B-32K-beta", "llama", "llama2", "togethercomputer/LLaMA-2-7B-32K", 6_738_415_616,
      # https://huggingface.co/togethercomputer/LLaMA-2-7B-32K/blob/main/config.json
      hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, max_position_embeddings=32768,
      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
_real("open_llama_7b", "llama", "alpaca", "openlm-research/open_llama_7b", 6_738_415_616,
      # https://huggingface.co/openlm-research/open_llama_7b/blob/main/config.json
      hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, max_position_embeddings=2048,
      num_attention_heads=32, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
_real("open_llama_3b", "llama", "alpaca", "openlm-research/open_llama_3b", 3_426_473_600,
      # https://huggingface.co/openlm-research/open_llama_3b/blob/main/config.json (head_dim 100)
      hidden_size=3200, num_hidden_layers=26, intermediate_size=8640, max_position_embeddings=2048,
      num_attention_heads=32, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
_real("llama-13b", "llama", "koala", "huggyllama/llama-13b", 13_015_864_320,
      # https://huggingface.co/huggyllama/llama-13b/blob/main/config.json
      hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, max_position_embeddings=2048,
      num_attention_heads=40, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
_real("Llama-2-13b-chat-hf", "llama", "llama2", "meta-llama/Llama-2-13b-chat-hf", 13_015_864_320,
      # https://huggingface.co/meta-llama/Llama-2-13b-chat-hf/blob/main/config.json
      hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, max_position_embeddings=4096,
      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip

# Today's families, with the templates their instruction models publish (chatkit.templates.families).
_real("Llama-3.1-8B-Instruct", "llama", "llama3", "meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248,
      # https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json
      hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, max_position_embeddings=131072,
      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)  # fmt: skip
_real("Qwen3-8B", "qwen3", "qwen3", "Qwen/Qwen3-8B", 8_190_735_360,
      # https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
      hidden_size=4096, num_hidden_layers=36, intermediate_size=12288, max_position_embeddings=40960,
      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
      tie_word_embeddings=False)  # fmt: skip
_real("Mistral-7B-Instruct-v0.3", "mistral", "mistral", "mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552,
      # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/config.json
      hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, max_position_embeddings=32768,
      num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False)  # fmt: skip
_real("gemma-2-9b-it", "gemma2", "gemma", "google/gemma-2-9b-it", 9_241_705_984,
      # https://huggingface.co/google/gemma-2-9b-it/blob/main/config.json
      hidden_size=3584, num_hidden_layers=42, intermediate_size=14336, max_position_embeddings=8192,
      num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
      tie_word_embeddings=True)  # fmt: skip

# Names these entries had before they took OpenChatKit's folder names (other spellings: any case).
_ALIASES = {"llama-2-7b-32k": "Llama-2-7B-32K-beta", "open-llama-7b": "open_llama_7b",
            "open-llama-3b": "open_llama_3b", "llama-2-13b-chat": "Llama-2-13b-chat-hf"}  # fmt: skip


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

    sized = dict(
        vocab_size=len(tokenizer),  # the tokenizer's, not a real entry's
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg = AutoConfig.for_model(spec.architecture, **{**spec.config, **sized, **overrides})
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
