"""One record per model family: everything chatkit knows about an architecture, in one place.

The trainer and the planner (LoRA targets, both through `resolve_lora_targets`; the planner's
parameter formulas), the pipeline engine and the pipeline checkpoint reader (where the embedding,
decoder layers, final norm and head live), the pretrained scripts and `chatkit.launch --tiny` (which
tiny model stands in for the family, and its MLP width when built at another hidden size) and the tests
all read these records, so a fact about a family cannot disagree with itself across modules.

Keys are transformers' `model_type`. Parameter formulas take a Hugging Face config as a plain dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"
"""PEFT's target for a family chatkit has no record of: every linear layer except the output head."""


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its pieces (Hugging Face state-dict prefixes) and how it is shaped."""

    model_type: str
    tiny: str
    """Registry name of this family's tiny model (`chatkit.launch --tiny`, tests)."""
    lora_targets: tuple[str, ...]
    """Module names LoRA adapts by default: every linear layer of the attention and MLP blocks."""
    base: str
    """Attribute of the causal LM that holds the decoder (`model.<base>.layers`)."""
    embed: str
    norm: str
    head: str
    embed_dropout: str | None = None
    mlp_matrices: int = 2
    """Weight matrices of one MLP block: 2 (up, down) or 3 (gated: gate, up, down)."""
    mlp_width: tuple[int, int] = (4, 1)
    """MLP width as a fraction of the hidden size, (numerator, denominator): `intermediate_size`."""
    pipeline: bool = True
    """Whether the pipeline engine can split it: its stages are the embedding, plain decoder layers, the
    norm and the head. Gemma 2 scales its embeddings and soft-caps its logits outside those modules."""

    def intermediate_size(self, hidden: int) -> int:
        """The MLP width of a model of this family `hidden` wide (a tiny model built at another width):
        GPT-NeoX's MLP is 4x the hidden size, Llama's SwiGLU about 8/3x, as their own configs have it."""
        num, den = self.mlp_width
        return num * hidden // den

    def linear_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of one decoder layer, by module name."""
        h, i = config["hidden_size"], config["intermediate_size"]
        heads = config.get("num_attention_heads") or 1
        head_dim = config.get("head_dim") or h // heads
        if self.model_type == "gpt_neox":
            return {
                "query_key_value": (h, 3 * h),
                "dense": (h, h),
                "dense_h_to_4h": (h, i),
                "dense_4h_to_h": (i, h),
            }
        kv = (config.get("num_key_value_heads") or heads) * head_dim
        return {
            "q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * head_dim, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip

    def lora_params(self, config: Mapping[str, Any], r: int, targets: Iterable[str] = ()) -> int:
        """Trainable parameters of rank-r LoRA: r x (in + out) per adapted module, as PEFT builds them.

        PEFT matches a target to a module whose name equals it or ends with `.target`; here the names
        are the last part of each linear module's name, so the same targets select the same modules.
        """
        shapes = self.linear_shapes(config)
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise ValueError(
                f"{self.model_type} has no linear module named {unknown}; it has {sorted(shapes)}"
            )
        per_layer = sum(sum(shapes[t]) for t in (targets or self.lora_targets))
        return r * per_layer * config["num_hidden_layers"]

    def nominal_params(self, config: Mapping[str, Any], vocab_size: int = 1024) -> int:
        """Parameters of the weight matrices (biases and norms left out): decoder layers, embedding, head."""
        h, n, i = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
        vocab = config.get("vocab_size", vocab_size)
        return n * (4 * h * h + self.mlp_matrices * h * i) + 2 * vocab * h


_LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt_neox": Architecture(
        "gpt_neox", "tiny", ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        base="gpt_neox", embed="embed_in", norm="final_layer_norm", head="lm_head", embed_dropout="emb_dropout",
    ),
    "llama": Architecture(
        "llama", "tiny-llama", _LLAMA_LINEAR,
        base="model", embed="embed_tokens", norm="norm", head="lm_head", mlp_matrices=3, mlp_width=(8, 3),
    ),
    # Llama-shaped families of 2024-25: the same module names, a gated MLP (Mistral's and Qwen3's
    # intermediate size is 3.5x and 3x the hidden size; Gemma 2's 4x), q/k norms (Qwen3) and
    # soft-capping (Gemma 2) holding no linear weights.
    "mistral": Architecture(
        "mistral", "tiny-mistral", _LLAMA_LINEAR,
        base="model", embed="embed_tokens", norm="norm", head="lm_head", mlp_matrices=3, mlp_width=(7, 2),
    ),
    "qwen3": Architecture(
        "qwen3", "tiny-qwen3", _LLAMA_LINEAR,
        base="model", embed="embed_tokens", norm="norm", head="lm_head", mlp_matrices=3, mlp_width=(3, 1),
    ),
    "gemma2": Architecture(
        "gemma2", "tiny-gemma2", _LLAMA_LINEAR,
        base="model", embed="embed_tokens", norm="norm", head="lm_head", mlp_matrices=3, mlp_width=(4, 1),
        pipeline=False,
    ),
}  # fmt: skip


def get_architecture(model_type: str) -> Architecture:
    """The record of `model_type`; a clear error naming the known ones otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"chatkit knows the architectures {known}; not {model_type!r}") from None


def resolve_lora_targets(cfg: Any, model_type: str | None) -> list[str] | str:
    """The modules LoRA adapts, for training (`chatkit.train.adapters`) and the plan (`chatkit.plan`) alike.

    `cfg.lora_targets` when the recipe sets them, else the defaults of `model_type`'s record; for a
    family without a record, PEFT's ALL_LINEAR (a string, which PEFT reads as that special target).
    """
    if cfg.lora_targets:
        return list(cfg.lora_targets)
    arch = ARCHITECTURES.get(model_type or "")
    return list(arch.lora_targets) if arch else ALL_LINEAR
