"""Packed attention without a (T, T) mask from chatkit (chatkit.train.attention): every implementation
that runs here keeps packed conversations apart, with the same loss and gradients as one conversation
at a time, and `varlen` never allocates anything (T, T)-sized."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

from chatkit.config import ConfigError, load_config
from chatkit.data import Pair, block_causal_mask, collate_pairs, collate_rows, pack_best_fit
from chatkit.tokenization import IGNORE_INDEX, Encoded
from chatkit.train.attention import (
    check_available,
    cu_seqlens,
    packed_forward_kwargs,
    register,
)

TRAINABLE = ["varlen", "sdpa", "eager"]  # flex_attention: forward only on CPU; flash_attention_2: CUDA
HAS_FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _tiny(arch: str, attn: str, kv_heads: int = 2, dropout: float = 0.0):
    """A seeded 2-layer, 64-wide model of `arch` (Llama with `kv_heads` of its 4 heads: GQA at 2)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    register()
    torch.manual_seed(0)
    common = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=4096, attention_dropout=dropout,
                  attn_implementation=attn)  # fmt: skip
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common))
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=kv_heads, **common))


def _examples(n: int = 12, seed: int = 1) -> list[Encoded]:
    """Conversations of 1 to 40 tokens (a one-token one among them), the first third untrained."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = 1 if k == 3 else rng.randint(2, 40)
        ids = [rng.randrange(2, 200) for _ in range(length)]
        out.append(Encoded(ids, [t if j > length // 3 else IGNORE_INDEX for j, t in enumerate(ids)]))
    return out


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (written out here, independent of chatkit.train.loss)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _forward(model, batch: dict[str, torch.Tensor], attn: str) -> torch.Tensor:
    kwargs = packed_forward_kwargs(batch["position_ids"], attn)
    return model(input_ids=batch["input_ids"], **kwargs).logits


def _loss_and_grads(model, batches: list[dict[str, torch.Tensor]], attn: str, count: int):
    """Per-token loss over `batches` and its gradient, accumulated batch by batch."""
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = _loss_sum(_forward(model, batch, attn), batch["labels"]) / count
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _count(examples: list[Encoded]) -> int:
    return sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in examples)


def _assert_same(a: tuple, b: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) < 1e-5
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)


CASES = [(attn, arch, 4 if arch == "gpt_neox" else 2) for attn in TRAINABLE for arch in ("gpt_neox", "llama")]


@pytest.mark.parametrize(("attn", "arch", "kv_heads"), [*CASES, ("varlen", "llama", 1)])  # GQA, MQA
def test_packed_loss_and_gradients_equal_one_conversation_at_a_time(attn, arch, kv_heads):
    model = _tiny(arch, attn, kv_heads).train()  # no dropout configured: train mode is deterministic
    examples = _examples(8)
    count = _count(examples)
    alone = _loss_and_grads(model, [collate_rows([[e]], 0) for e in examples], attn, count)
    rows = pack_best_fit([len(e.input_ids) for e in examples], 64)
    assert len(rows) < len(examples)
    packed = collate_rows([[examples[i] for i in r] for r in rows], 0)
    assert (packed["segment_ids"] < 0).any()  # rows of unequal fill: padding present
    _assert_same(alone, _loss_and_grads(model, [packed], attn, count))
    padded = collate_rows([[e] for e in examples], 0)  # one conversation a row, mostly padding
    _assert_same(alone, _loss_and_grads(model, [padded], attn, count))


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_varlen_logits_equal_the_dense_block_mask(arch):
    """The reference built from segment ids (chatkit.data.block_causal_mask) with eager attention."""
    examples = _examples(seed=4)
    rows = pack_best_fit([len(e.input_ids) for e in examples], 64)
    batch = collate_rows([[examples[i] for i in r] for r in rows], 0)
    reference = _tiny(arch, "eager").eval()
    with torch.no_grad():
        ref = reference(
            input_ids=batch["input_ids"],
            attention_mask=block_causal_mask(batch["segment_ids"], torch.float32),
            position_ids=batch["position_ids"],
        ).logits
        got = _forward(_tiny(arch, "varlen").eval(), batch, "varlen")
    trained = batch["segment_ids"] >= 0  # padding outputs are never read
    torch.testing.assert_close(got[trained], ref[trained], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


def test_sequence_bounds_agree_with_segment_ids():
    """Restarting positions alone give collate_rows' and collate_pairs' segments, one per padding token."""
    a, b, c = Encoded([5, 6, 7], [5, 6, 7]), Encoded([8, 9], [8, 9]), Encoded([4], [4])
    batch = collate_rows([[a, b, c], [b]], pad_id=0)
    assert cu_seqlens(batch["position_ids"]).tolist() == [0, 3, 5, 6, 8, 9, 10, 11, 12]
    pairs = collate_pairs([[Pair(a, b, 0.0, 0.0)], [Pair(c, c, 0.0, 0.0)]], pad_id=0)
    for rows in (batch, pairs):
        seg = rows["segment_ids"].reshape(-1)
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[1:] = seg[1:] != seg[:-1]
        starts[:: rows["segment_ids"].size(1)] = True  # every row starts a sequence
        assert cu_seqlens(rows["position_ids"])[:-1].tolist() == starts.nonzero().reshape(-1).tolist()


def _long_row(t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One row of about `t` tokens: conversations of 20-120 tokens, then a little padding."""
    rng = random.Random(seed)
    examples, total = [], 0
    while total < t - 130:
        n = rng.randint(20, 120)
        ids = [rng.randrange(2, 200) for _ in range(n)]
        examples.append(Encoded(ids, ids))
        total += n
    batch = collate_rows([examples], 0)
    width = batch["input_ids"].size(1)
    pad = torch.zeros(1, t - width, dtype=torch.long)
    return {
        "input_ids": torch.cat([batch["input_ids"], pad], 1),
        "labels": torch.cat([batch["labels"], pad - 100], 1),
        "position_ids": torch.cat([batch["position_ids"], pad], 1),
    }


def test_varlen_builds_no_mask_and_calls_sdpa_per_conversation(monkeypatch):
    from transformers.masking_utils import create_causal_mask

    model = _tiny("llama", "varlen")
    batch = _long_row(512)
    hidden = torch.zeros(1, 512, 64)
    assert create_causal_mask(model.config, hidden, None, None, position_ids=batch["position_ids"]) is None
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask, q.size(-2), kwargs.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _loss_sum(_forward(model, batch, "varlen"), batch["labels"]).backward()
    bounds = cu_seqlens(batch["position_ids"])
    longest = int((bounds[1:] - bounds[:-1]).max())
    assert len(calls) == 2 * int(((bounds[1:] - bounds[:-1]) > 1).sum())  # 2 layers, each conversation
    assert all(mask is None and n <= longest and causal for mask, n, causal in calls)


def _largest_allocation(model, batch: dict[str, torch.Tensor], attn: str) -> int:
    """Bytes of the largest single CPU allocation of one forward and backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _loss_sum(_forward(model, batch, attn), batch["labels"]).backward()
    return max(e.cpu_memory_usage for e in prof.events())


def test_varlen_allocates_nothing_of_size_t_by_t():
    """At T = 2048 a (T, T) boolean mask is 4 MiB; the largest per-token tensors here are about 2 MiB.
    The dense sdpa path is the control: it does allocate (T, T)-sized tensors."""
    t = 2048
    batch = _long_row(t)
    assert _largest_allocation(_tiny("llama", "varlen"), batch, "varlen") < t * t
    assert _largest_allocation(_tiny("llama", "sdpa"), batch, "sdpa") >= t * t


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_varlen_generates_as_sdpa(arch):
    """With a KV cache and a padding mask varlen is sdpa: a model trained with it generates as usual."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()  # left padding on the first row
    outs = []
    for attn in ("varlen", "sdpa"):
        model = _tiny(arch, attn).eval()
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, **kwargs))
    assert torch.equal(*outs)


def test_saved_config_does_not_name_varlen(tmp_path):
    """A checkpoint loads anywhere: the implementation is a load-time choice, not saved."""
    _tiny("llama", "varlen").save_pretrained(tmp_path)
    assert "varlen" not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("attn", TRAINABLE)
def test_pipeline_layers_keep_packed_rows_apart(arch, attn):
    """DecoderPipe calls each layer itself, with what layer_attention_kwargs derives per layer."""
    from chatkit.train.pipeline_model import layer_specs

    model = _tiny(arch, attn).eval()
    examples = _examples(seed=2)
    rows = pack_best_fit([len(e.input_ids) for e in examples], 64)
    batch = collate_rows([[examples[i] for i in r] for r in rows], 0)
    x = (batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    with torch.no_grad():
        for spec in layer_specs(model):
            module = spec.build()
            x = spec.forward_fn(module, x) if getattr(spec, "forward_fn", None) else module(x)
        ref = model(
            input_ids=batch["input_ids"],
            attention_mask=block_causal_mask(batch["segment_ids"], torch.float32),
            position_ids=batch["position_ids"],
        ).logits
    trained = batch["segment_ids"] >= 0
    torch.testing.assert_close(x[trained], ref[trained], rtol=1e-5, atol=1e-5)


def test_flash_kwargs_carry_cumulative_lengths_over_the_flattened_batch():
    """FA2 reads packed sequences from position_ids only for one row: chatkit passes cu_seqlens."""
    batch = collate_rows([[Encoded([5, 6, 7], [5, 6, 7]), Encoded([8, 9], [8, 9])], [Encoded([4], [4])]], 0)
    kwargs = packed_forward_kwargs(batch["position_ids"], "flash_attention_2")
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 7, 8, 9, 10]
    assert kwargs["max_length_q"] == 3 and kwargs["attention_mask"] is None and not kwargs["use_cache"]
    assert "cu_seq_lens_q" not in packed_forward_kwargs(batch["position_ids"], "sdpa")


def test_attention_setting_is_validated_in_one_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    assert load_config(None, [f"train_files={data}"]).attention == "varlen"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train_files={data}", "attention=flash"])
    (line,) = [x for x in str(e.value).splitlines() if "attention" in x]
    assert "varlen" in line and "'flash'" in line


def test_implementations_that_cannot_train_here_say_so_in_one_line():
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        check_available("flex_attention", torch.device("cpu"))
    if not HAS_FLASH:
        with pytest.raises(ValueError, match="flash-attn"):
            check_available("flash_attention_2", torch.device("cpu"))
    check_available("varlen", torch.device("cpu"))


@pytest.mark.slow  # torch.compile of flex_attention: 15-40 s on 2 cores
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_flex_attention_forward_keeps_packed_rows_apart(arch):
    """Forward only: PyTorch has no flex_attention backward on CPU (check_available refuses to train)."""
    examples = _examples()
    rows = pack_best_fit([len(e.input_ids) for e in examples], 64)
    packed = collate_rows([[examples[i] for i in r] for r in rows], 0)
    model = _tiny(arch, "flex_attention").eval()
    with torch.no_grad():
        alone = sum(float(_loss_sum(_forward(model, b, "flex_attention"), b["labels"]))
                    for b in (collate_rows([[e]], 0) for e in examples))  # fmt: skip
        together = float(_loss_sum(_forward(model, packed, "flex_attention"), packed["labels"]))
    count = _count(examples)
    assert abs(alone / count - together / count) < 1e-5


def _on(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASH, reason="flash_attention_2 needs a CUDA GPU and the flash-attn package")
@pytest.mark.parametrize("attn", ["flash_attention_2", "varlen", "flex_attention"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_gpu_packed_loss_equals_one_conversation_at_a_time(arch, attn):
    """bf16 on CUDA, where FA2 (flattened cu_seqlens) and flex_attention's backward exist."""
    model = _tiny(arch, attn).to("cuda", torch.bfloat16).train()
    examples = _examples()
    rows = pack_best_fit([len(e.input_ids) for e in examples], 64)
    packed = _on(collate_rows([[examples[i] for i in r] for r in rows], 0), "cuda")
    alone = [_on(collate_rows([[e]], 0), "cuda") for e in examples]
    count = _count(examples)
    a, _ = _loss_and_grads(model, alone, attn, count)
    b, _ = _loss_and_grads(model, [packed], attn, count)
    assert abs(a - b) < 2e-2  # bf16


def _family(model_type: str, attn: str):
    """A seeded 2-layer model of a 2024-25 family, GQA, with what sets it apart switched on: a sliding
    window of 16 tokens (shorter than most test conversations) for Mistral and Gemma 2 (whose local
    layers alternate with global ones), Gemma 2's attention and final-logit soft-capping, Qwen3's q/k
    norms."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    torch.manual_seed(0)
    extra = {"mistral": dict(sliding_window=16), "gemma2": dict(sliding_window=16, head_dim=16),
             "qwen3": dict(head_dim=16)}[model_type]  # fmt: skip
    config = AutoConfig.for_model(
        model_type, vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096, **extra,
    )  # fmt: skip
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", ["qwen3", "mistral", "gemma2"])
def test_todays_families_packed_varlen_equals_transformers_eager_alone(model_type):
    """Packed rows under varlen train exactly as transformers' own eager attention on each conversation
    alone: soft-capping and sliding windows (the windowed conversations take the per-conversation
    path) included."""
    eager = _family(model_type, "eager").train()
    varlen = _family(model_type, "varlen").train()
    varlen.load_state_dict(eager.state_dict())
    if model_type == "gemma2":
        assert eager.config.attn_logit_softcapping and eager.config.final_logit_softcapping
    examples = _examples(8)
    assert max(len(e.input_ids) for e in examples) > 16  # some conversations outgrow the window
    count = _count(examples)
    alone = _loss_and_grads(eager, [collate_rows([[e]], 0) for e in examples], "eager", count)
    rows = pack_best_fit([len(e.input_ids) for e in examples], 64)
    packed = collate_rows([[examples[i] for i in r] for r in rows], 0)
    _assert_same(alone, _loss_and_grads(varlen, [packed], "varlen", count))
