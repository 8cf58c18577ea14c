"""Preparing base models in the layout the trainer reads (a Hugging Face folder)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from chatkit.conversation import iter_jsonl
from chatkit.models import build_model, get_model_spec, save_base, train_tokenizer
from chatkit.templates import get_template

TINY_BY_ARCH = {"gpt_neox": "tiny", "llama": "tiny-llama"}
"""The tiny registry entry of each architecture; `chatkit.launch --tiny` swaps it in for a recipe's base."""


def _corpus_texts(paths: Sequence[str], template: str) -> Iterator[str]:
    tpl = get_template(template)
    # The template's literal pieces, so markers like "<human>:" become single tokens.
    yield tpl.render([], "", "")
    pieces = (
        tpl.system,
        tpl.user,
        tpl.user_after_system or "",
        tpl.assistant_prefix,
        tpl.assistant,
        tpl.separator,
    )
    for piece in pieces:
        yield piece.replace("{content}", " ").replace("{eos}", "").replace("{bos}", "")
    if not paths:
        from chatkit.datasets.synthetic import make_splits

        train, _ = make_splits(5000, 0)
        for conv in train:
            yield tpl.render(conv.messages, "", "")
        return
    for path in paths:
        if path.endswith(".jsonl"):
            for conv in iter_jsonl(path):
                yield tpl.render(conv.messages, "", "")
        else:
            yield from Path(path).read_text(encoding="utf-8").splitlines()


def prepare_tiny(
    corpus: Sequence[str],
    out: str,
    vocab_size: int = 1024,
    template: str = "openchatkit",
    seed: int = 0,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    arch: str = "gpt_neox",
) -> int:
    """Train a tokenizer on `corpus`, build the tiny model, save both to `out`; returns #params.

    `arch` is gpt_neox (registry entry `tiny`) or llama (`tiny-llama`); the tokenizer is the same.
    """
    spec = get_model_spec(TINY_BY_ARCH[arch])
    tpl = get_template(template)
    tokenizer = train_tokenizer(_corpus_texts(corpus, template), vocab_size, extra_tokens=tpl.special_tokens)
    overrides = {}
    if layers:
        overrides["num_hidden_layers"] = layers
    if hidden:
        overrides["hidden_size"] = hidden
        # GPT-NeoX's MLP is 4x wide; Llama's SwiGLU about 8/3x, as its own configs have it.
        overrides["intermediate_size"] = 4 * hidden if arch == "gpt_neox" else 8 * hidden // 3
    if heads:
        overrides["num_attention_heads"] = heads
        if arch == "llama":
            overrides["num_key_value_heads"] = heads
    model = build_model(spec, tokenizer, seed, **overrides)
    save_base(model, tokenizer, out, template)
    return sum(p.numel() for p in model.parameters())
