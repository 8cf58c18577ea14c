"""The chunked losses (chatkit.train.chunked) against the full-logits ones, values and gradients.

The fast tier takes seconds; `-m slow` adds single-rank ZeRO-3 in a subprocess (about 15 s).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chatkit.tokenization import IGNORE_INDEX
from chatkit.train.chunked import (
    CHUNK_TOKENS,
    call_in_engine_forward,
    chunked_token_logps,
    chunked_token_loss_sum,
    chunking_helps,
    trained_rows,
)
from chatkit.train.loss import token_loss_sum

REPO = Path(__file__).resolve().parents[1]


def make(B: int, T: int, C: int, V: int, seed: int = 0, ignored: float = 0.3, bias: bool = False):
    """Random hidden (B, T, C), weight (V, C), labels (B, T) with a share ignored, optional bias (V,)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = (torch.randn(V, C, generator=g) / C**0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignored] = IGNORE_INDEX
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    return hidden, weight, labels, b


def grads(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    for t in tensors:
        if t is not None:
            t.grad = None
    loss.backward()
    return [None if t is None else t.grad for t in tensors]


def full_loss(hidden, weight, labels, bias=None):
    return token_loss_sum(F.linear(hidden, weight, bias), labels)


def full_logps(hidden, weight, labels, bias=None):
    return full_logps_of(F.linear(hidden, weight, bias), labels)


def full_logps_of(logits, labels):
    """The reference: log_softmax over full logits, gathered at the targets, 0 where ignored."""
    target = labels[:, 1:]
    logps = logits[:, :-1].float().log_softmax(-1)
    picked = logps.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return picked * (target != IGNORE_INDEX)


def close(a, b, rtol: float = 1e-5) -> None:
    """Equal to rtol relative to the tensor's scale (elements near zero are judged against the largest)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max().clamp(min=1e-12)))


# ---------------------------------------------------------------- the supervised loss


@pytest.mark.parametrize(
    "B,T,C,V,chunk",
    [(1, 7, 5, 11, 1), (3, 33, 8, 50, 4), (2, 64, 16, 97, 10), (2, 40, 8, 30, CHUNK_TOKENS)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_equal_full_logits(B, T, C, V, chunk, bias):
    hidden, weight, labels, b = make(B, T, C, V, bias=bias)
    ref = full_loss(hidden, weight, labels, b)
    ref_grads = grads(ref, hidden, weight, b)
    out = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens=chunk, bias=b)
    assert out.dtype == torch.float32 and out.shape == ()
    close(out.detach(), ref.detach())
    for got, want in zip(grads(out * 0.37, hidden, weight, b), ref_grads, strict=True):  # scaled backward
        if want is not None:
            close(got, want * 0.37)


def test_all_ignored_rows_and_batches():
    hidden, weight, labels, _ = make(3, 9, 4, 13)
    labels[1] = IGNORE_INDEX  # one row with nothing to train
    ref_grads = grads(full_loss(hidden, weight, labels), hidden, weight)
    out = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens=4)
    close(out.detach(), full_loss(hidden, weight, labels).detach())
    got = grads(out, hidden, weight)
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))
    for g, w in zip(got, ref_grads, strict=True):
        close(g, w)
    labels[:] = IGNORE_INDEX  # nothing at all: zero loss and zero (not missing) gradients
    out = chunked_token_loss_sum(hidden, weight, labels)
    assert float(out.detach()) == 0.0
    gh, gw = grads(out, hidden, weight)
    assert gh.shape == hidden.shape and not gh.any() and gw.shape == weight.shape and not gw.any()


def test_bf16_hidden_fp32_head_gives_fp32_math_and_bf16_gradient():
    hidden, weight, labels, _ = make(2, 37, 16, 61)
    h16 = hidden.detach().bfloat16().requires_grad_()
    h32 = h16.detach().float().requires_grad_()  # the same values, upcast: what the fp32 math sees
    ref_h, ref_w = grads(full_loss(h32, weight, labels), h32, weight)
    out = chunked_token_loss_sum(h16, weight, labels, chunk_tokens=8)
    close(out.detach(), full_loss(h32, weight, labels).detach())
    gh, gw = grads(out, h16, weight)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    close(gw, ref_w)
    close(gh, ref_h.bfloat16(), rtol=1e-2)  # the fp32 gradient rounded once to bf16


def test_bf16_model_matches_the_bf16_full_path():
    """All bf16 (a bf16 model's head): the matmuls run in bf16 as the model's lm_head runs them."""
    hidden, weight, labels, _ = make(2, 50, 32, 101)
    h, w = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    ref = full_loss(h, w, labels)
    ref_h, ref_w = grads(ref, h, w)
    out = chunked_token_loss_sum(h, w, labels, chunk_tokens=16)
    gh, gw = grads(out, h, w)
    assert gh.dtype == gw.dtype == torch.bfloat16
    close(out.detach(), ref.detach(), rtol=1e-3)
    close(gh, ref_h, rtol=2e-2)
    close(gw, ref_w, rtol=2e-2)


def test_frozen_head_and_no_grad():
    hidden, weight, labels, _ = make(2, 21, 8, 40)
    weight.requires_grad_(False)  # LoRA: the head is frozen
    (ref_h,) = grads(full_loss(hidden, weight, labels), hidden)
    out = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens=5)
    (gh,) = grads(out, hidden)
    close(gh, ref_h)
    assert weight.grad is None
    with torch.no_grad():  # evaluation: the loss alone
        ev = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens=5)
    assert not ev.requires_grad
    close(ev, out.detach())


def test_tied_head_gradient_adds_to_the_embedding_gradient():
    """The head is the embedding: the weight's gradient is the sum of both uses, as with full logits."""
    g = torch.Generator().manual_seed(1)
    V, C, B, T = 29, 8, 2, 17
    embed = torch.randn(V, C, generator=g).requires_grad_()
    mix = torch.randn(C, C, generator=g).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt

    def hidden():
        return torch.tanh(F.embedding(ids, embed) @ mix)

    ref = grads(full_loss(hidden(), embed, labels), embed, mix)
    got = grads(chunked_token_loss_sum(hidden(), embed, labels, chunk_tokens=6), embed, mix)
    for a, b in zip(got, ref, strict=True):
        close(a, b)


def test_trained_rows_index_the_shifted_positions():
    labels = torch.tensor([[5, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 2, IGNORE_INDEX, 3]])
    rows, out_idx, targets = trained_rows(labels)
    # row 0: t=1 -> 7, t=2 -> 8; row 1: t=0 -> 2, t=2 -> 3 (rows index (B*T), out_idx index (B*(T-1)))
    assert rows.tolist() == [1, 2, 4, 6]
    assert out_idx.tolist() == [1, 2, 3, 5]
    assert targets.tolist() == [7, 8, 2, 3]


# ---------------------------------------------------------------- per-token log-probabilities


@pytest.mark.parametrize("B,T,C,V,chunk", [(1, 9, 4, 13, 2), (3, 33, 8, 50, 7), (2, 20, 8, 30, CHUNK_TOKENS)])
@pytest.mark.parametrize("bias", [False, True])
def test_logps_and_gradients_equal_log_softmax_gather(B, T, C, V, chunk, bias):
    hidden, weight, labels, b = make(B, T, C, V, seed=3, bias=bias)
    labels[0, : T // 2] = IGNORE_INDEX
    upstream = torch.randn(B, T - 1, generator=torch.Generator().manual_seed(4))  # any later loss
    ref = full_logps(hidden, weight, labels, b)
    ref_grads = grads((ref * upstream).sum(), hidden, weight, b)
    out = chunked_token_logps(hidden, weight, labels, chunk_tokens=chunk, bias=b)
    assert out.shape == (B, T - 1) and out.dtype == torch.float32
    assert not out[labels[:, 1:] == IGNORE_INDEX].any()
    close(out.detach(), ref.detach())
    for got, want in zip(grads((out * upstream).sum(), hidden, weight, b), ref_grads, strict=True):
        if want is not None:
            close(got, want)


def test_logps_bf16_frozen_head_and_no_grad():
    hidden, weight, labels, _ = make(2, 25, 16, 45, seed=5)
    weight.requires_grad_(False)
    h16 = hidden.detach().bfloat16().requires_grad_()
    h32 = h16.detach().float().requires_grad_()
    (ref_h,) = grads(full_logps(h32, weight, labels).sum(), h32)
    out = chunked_token_logps(h16, weight, labels, chunk_tokens=6)
    close(out.detach(), full_logps(h32, weight, labels).detach())
    (gh,) = grads(out.sum(), h16)
    assert gh.dtype == torch.bfloat16
    close(gh, ref_h.bfloat16(), rtol=1e-2)
    with torch.no_grad():
        assert not chunked_token_logps(h16, weight, labels).requires_grad


def test_logps_tell_a_released_zero3_weight():
    """A weight emptied between forward and backward (ZeRO-3 released it) is an error that says why."""
    hidden, weight, labels, _ = make(1, 8, 4, 10)
    out = chunked_token_logps(hidden, weight, labels)
    weight.data = torch.empty(0)  # what ZeRO-3 does to a partitioned parameter outside its module
    with pytest.raises(RuntimeError, match="call_in_engine_forward"):
        out.sum().backward()


# ---------------------------------------------------------------- when to chunk


def test_chunking_helps():
    assert not chunking_helps(256, 50_000, 512)  # 12.8M logits: too small to matter
    assert chunking_helps(4096, 50_000, 512)  # the benchmark's row
    assert not chunking_helps(4096, 32_000, 4096)  # 7B: the fp32 weight-gradient buffer is large
    assert chunking_helps(4096, 32_000, 4096, trains_head=False)  # LoRA: no weight gradient
    assert chunking_helps(2 * CHUNK_TOKENS + 4096, 32_000, 4096)  # the documented break-even
    assert not chunking_helps(2 * CHUNK_TOKENS + 4095, 32_000, 4096)


# ---------------------------------------------------------------- ZeRO-3, one rank, in a subprocess


def zero3_main() -> None:
    """Gradients under ZeRO-3 (one CPU rank, every parameter partitioned) of the full-logits losses and
    of the chunked ones run through `call_in_engine_forward`, tied and untied. Prints one JSON line: the
    largest difference of each chunked run, relative to each gradient's largest element."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    V, C, B, T = 37, 16, 2, 23
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    later = torch.linspace(0.5, 1.5, T - 1)  # an arbitrary later loss over the log-probabilities

    class Tiny(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(V, C)
            self.mix = torch.nn.Linear(C, C)
            self.norm = torch.nn.LayerNorm(C)
            self.head = torch.nn.Linear(C, V)
            self.tied = tied

        def hidden(self, ids):
            return self.norm(torch.tanh(self.mix(self.embed(ids))))

        def head_weight(self):
            return self.embed.weight if self.tied else self.head.weight  # read by attribute

        def forward(self, ids, labels, logps: bool):  # the full-logits references
            logits = F.linear(self.hidden(ids), self.head_weight(), self.head.bias)
            if logps:
                return (full_logps_of(logits, labels) * later).sum()
            return token_loss_sum(logits, labels)

    def chunked(model: Tiny, logps: bool):
        def fn(ids, labels, _):
            h, w, b = model.hidden(ids), model.head_weight(), model.head.bias
            if logps:
                return (chunked_token_logps(h, w, labels, 5, b) * later).sum()
            return chunked_token_loss_sum(h, w, labels, 5, b)

        return fn

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        # persistence 0: even tiny parameters are partitioned (numel 0 outside their module's forward)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }

    def run(tied: bool, logps: bool, chunk: bool) -> dict[str, torch.Tensor]:
        engine, *_ = deepspeed.initialize(model=Tiny(tied), config=config)
        if chunk:
            loss = call_in_engine_forward(engine, chunked(engine.module, logps), ids, labels, logps)
        else:
            loss = engine(ids, labels, logps)
        engine.backward(loss)
        out = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.destroy()
        return out

    def rel(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)

    result = {}
    for tied in (False, True):
        for logps in (False, True):
            name = f"{'tied' if tied else 'untied'}_{'logps' if logps else 'loss'}"
            result[name] = rel(run(tied, logps, chunk=True), run(tied, logps, chunk=False))
    print(json.dumps(result))


@pytest.mark.slow
def test_zero3_gradients_equal():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(v < 1e-5 for v in result.values()), result


if __name__ == "__main__":
    zero3_main()
