"""Token losses from last hidden states and the output projection, never forming all logits at once.

`chatkit.train.loss.token_loss_sum` takes logits (B, T, V): a 4,096-token row over a 50k vocabulary is
800 MB of fp32 logits, and the loss, its log-softmax and their gradients hold two or three of those.
Here the head is applied chunk by chunk to the positions that are trained (the next label is not
IGNORE_INDEX), so untrained prompt tokens also skip the head's matmuls, and at most one chunk's logits
(CHUNK_TOKENS x V) exist at a time.

- `chunked_token_loss_sum(hidden, weight, labels)` equals `token_loss_sum(F.linear(hidden, weight),
  labels)`: the supervised loss. It is *fused* (as Liger-Kernel's fused linear cross-entropy): the
  forward computes the gradients w.r.t. hidden, weight and bias chunk by chunk and keeps them; the
  backward only multiplies them by the incoming scalar gradient and never reads `weight` (nor keeps
  hidden: only the (N, C) hidden gradient and the (V, C) weight gradient are held until backward).
- `chunked_token_logps(hidden, weight, labels)` gives each position's log-probability of its target,
  (B, T-1), zero where ignored: what preference losses sum per sequence
  (`chatkit.train.preference.sequence_logps`). Its output gradient is a tensor, not a scalar, so the
  backward recomputes each chunk's logits from the saved `weight`; it raises if that weight has been
  emptied since the forward (a ZeRO-3 parameter nobody gathered again).

Precision: each chunk's head matmul runs in the wider of hidden's and weight's dtypes, exactly where
the model's own lm_head runs it; log-softmax, the loss and the gradient of the logits are fp32, as in
`token_loss_sum` (which upcasts the logits); the weight and bias gradients are summed over chunks in
fp32 and returned in the parameters' dtypes; the hidden gradient comes back in hidden's dtype.

ZeRO-3. A partitioned parameter holds no data (numel 0) outside the forward and backward of the module
that owns it, and `weight` is read here by attribute, not through the head module. So call these
functions inside the DeepSpeed engine's forward: `call_in_engine_forward(engine, fn, ...)` runs `fn`
(hidden states from the base model, then the loss) as the wrapped module's forward. DeepSpeed then
gathers a parameter read by attribute, registers it as an external parameter of the running module
(`ZeROOrderedDict.__getitem__`), and gathers it again before that module's backward, where the
weight's gradient is accumulated and reduced. `deepspeed.zero.GatheredParameters` around a call made
outside the engine's forward is not enough, fused or not: the forward works, but the backward fails
accumulating the dense weight gradient into the released parameter ("The size of tensor a (0) must
match the size of tensor b (C)"; DeepSpeed 0.19.8, as huggingface/trl#6372 describes), which is why
TRL redirects such losses through the engine's forward too. tests/test_chunked_loss.py checks
gradients under single-rank ZeRO-3 with every parameter partitioned, tied and untied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from chatkit.tokenization import IGNORE_INDEX

CHUNK_TOKENS = 1024
"""Trained positions per chunk. Each chunk's matmul re-reads the whole head weight (V x C), doing
2 * chunk * V * C FLOPs per 2 * V * C bf16 bytes: chunk FLOPs per byte. A GPU stays compute-bound above
~300 FLOP/byte (H100/H200: ~990 TFLOP/s bf16 over ~3.4-4.8 TB/s), so 1,024 keeps the head at full speed
with margin, while one chunk's logits stay small: 1,024 x 50k x 6 bytes (fp32 logits + their
bf16 gradient) = 300 MB; at a 128k vocabulary, 790 MB. Halve it for 256k vocabularies if memory is
tight."""

CHUNKED_LOSS_MIN_LOGITS = 2**24
"""Below this many logits in a micro-batch (64 MB in fp32) chunking saves too little to matter."""

CHUNKED_LOSS_MIN_SAVING = 2.0
"""Chunking is chosen when the full-logits loss would hold at least this many times the memory."""


def chunking_helps(
    tokens: int, vocab: int, hidden: int, chunk_tokens: int = CHUNK_TOKENS, trains_head: bool = True
) -> bool:
    """Whether the chunked loss needs at most 1/CHUNKED_LOSS_MIN_SAVING of the full-logits loss's
    memory for a micro-batch of `tokens` positions (B * T), so engines can turn it on automatically.

    The full loss holds about tokens x V x 8 bytes (fp32 logits and their gradient; a bf16 model adds its
    bf16 logits). The chunked one holds one chunk's share of that, plus an fp32 weight-gradient buffer
    of V x hidden x 4 bytes when the head trains. With the defaults that is from 2 * chunk_tokens +
    hidden tokens per micro-batch, whatever the vocabulary: 6,144 for a 7B model (hidden 4,096), 2,560
    for a 512-wide one; with a frozen head (LoRA) from 2 * chunk_tokens.
    """
    if tokens * vocab < CHUNKED_LOSS_MIN_LOGITS:
        return False
    full = tokens * vocab * 8
    chunked = min(tokens, chunk_tokens) * vocab * 8 + (vocab * hidden * 4 if trains_head else 0)
    return full >= CHUNKED_LOSS_MIN_SAVING * chunked


def trained_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the loss is taken: (rows into hidden.reshape(B * T, C), the same positions as indices into
    a flattened (B, T-1), their targets), (N,) each. Position t predicts label t + 1."""
    T = labels.size(1)
    shifted = labels[:, 1:]
    b, t = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return b * T + t, b * (T - 1) + t, shifted[b, t]


def _probs_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn fp32 logits (n, V) into probabilities in place (one (n, V) buffer, no temporaries of its size);
    return (target logits, log-sum-exp), (n,) each."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(1, keepdim=True)
    logits.sub_(top).exp_()
    total = logits.sum(1, keepdim=True)
    logits.div_(total)
    return picked, (top + total.log()).squeeze(1)


def _operands(
    weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor
) -> tuple[torch.dtype, torch.Tensor, torch.Tensor | None]:
    """The matmul dtype (the wider of hidden's and weight's) and weight and bias in it."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype, weight.to(dtype), None if bias is None else bias.to(dtype)


class _Buffers:
    """Gradient accumulators of one pass over the chunks; None where no gradient is wanted."""

    def __init__(self, n: int, hidden: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, ...]):
        fp32 = {"dtype": torch.float32, "device": weight.device}
        self.rows = hidden.new_empty(n, hidden.size(-1)) if needs[0] else None
        self.weight = torch.zeros(weight.shape, **fp32) if needs[1] else None
        self.bias = torch.zeros(weight.size(0), **fp32) if needs[2] else None

    def add(self, s: slice, dlogits: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        """Add one chunk's share: dlogits (n, V) fp32, h (n, C) and w (V, C) in the matmul dtype."""
        if self.bias is not None:
            self.bias += dlogits.sum(0)
        g = dlogits.to(w.dtype)  # the matmuls run where the model's head runs them (bf16 stays bf16)
        if self.rows is not None:
            self.rows[s] = g @ w
        if self.weight is not None:  # an fp32 sum over chunks
            if h.dtype == self.weight.dtype:
                self.weight.addmm_(g.t(), h)
            else:  # bf16 product (V, C), added into fp32
                self.weight.add_(g.t() @ h)


def _scatter_rows(rows: torch.Tensor, grads: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(N, C) gradients of the trained rows -> the (B, T, C) gradient of hidden, zero elsewhere."""
    out = grads.new_zeros(shape[0] * shape[1], shape[2])
    return out.index_copy_(0, rows, grads).view(shape)


def _cast(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or like is None else t.to(like.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed next-token cross-entropy of F.linear(hidden, weight, bias), gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens: int, grads: bool):
        rows, _, targets = trained_rows(labels)
        flat = hidden.reshape(-1, hidden.size(-1))  # (B*T, C)
        dtype, w, b = _operands(weight, bias, hidden)
        needs = tuple(grads and n for n in ctx.needs_input_grad[:3])
        acc = _Buffers(rows.numel(), hidden, weight, needs)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_tokens):
            s = slice(start, start + chunk_tokens)
            h, y = flat[rows[s]].to(dtype), targets[s]  # (n, C), (n,)
            probs = F.linear(h, w, b).float()  # (n, V), about to become the softmax
            picked, lse = _probs_(probs, y)
            loss += (lse - picked).sum()
            if any(needs):
                probs[torch.arange(len(y), device=y.device), y] -= 1  # d loss / d logits
                acc.add(s, probs, h, w)
            del probs
        ctx.save_for_backward(rows, acc.rows, acc.weight, acc.bias)
        ctx.shape, ctx.weight_dtype = hidden.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, g_rows, g_weight, g_bias = ctx.saved_tensors
        g_hidden = None if g_rows is None else _scatter_rows(rows, g_rows * grad_loss, ctx.shape)
        g_weight = None if g_weight is None else (g_weight * grad_loss).to(ctx.weight_dtype)
        g_bias = None if g_bias is None else (g_bias * grad_loss).to(ctx.bias_dtype)
        return g_hidden, g_weight, g_bias, None, None, None


class _LinearTargetLogprobs(torch.autograd.Function):
    """log softmax(F.linear(hidden, weight, bias))[target] per position; logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens: int, grads: bool):
        rows, out_idx, targets = trained_rows(labels)
        flat = hidden.reshape(-1, hidden.size(-1))
        dtype, w, b = _operands(weight, bias, hidden)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        out = torch.zeros(labels.size(0), labels.size(1) - 1, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_tokens):
            s = slice(start, start + chunk_tokens)
            logits = F.linear(flat[rows[s]].to(dtype), w, b).float()  # (n, V)
            picked, lse[s] = _probs_(logits, targets[s])
            out.view(-1)[out_idx[s]] = picked - lse[s]
            del logits
        if grads and any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, rows, out_idx, targets, lse)
            ctx.chunk_tokens, ctx.weight_shape = chunk_tokens, weight.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, rows, out_idx, targets, lse = ctx.saved_tensors
        if weight.shape != ctx.weight_shape:
            raise RuntimeError(
                f"chunked_token_logps: the head weight is {tuple(weight.shape)} in backward, "
                f"{tuple(ctx.weight_shape)} in forward. Under ZeRO-3 call it inside the engine's forward "
                "(chatkit.train.chunked.call_in_engine_forward) so the weight is gathered again for the "
                "backward."
            )
        flat = hidden.reshape(-1, hidden.size(-1))
        dtype, w, b = _operands(weight, bias, hidden)
        acc = _Buffers(rows.numel(), hidden, weight, ctx.needs_input_grad[:3])
        g_all = grad_out.reshape(-1)[out_idx].float()  # (N,)
        for start in range(0, rows.numel(), ctx.chunk_tokens):
            s = slice(start, start + ctx.chunk_tokens)
            h, y, g = flat[rows[s]].to(dtype), targets[s], g_all[s]
            dlogits = F.linear(h, w, b).float().sub_(lse[s, None]).exp_()  # (n, V) softmax
            dlogits.mul_(-g[:, None])  # d (g * logp_y) / d logits = g * (onehot_y - softmax)
            dlogits[torch.arange(len(y), device=y.device), y] += g
            acc.add(s, dlogits, h, w)
            del dlogits
        g_hidden = None if acc.rows is None else _scatter_rows(rows, acc.rows, hidden.shape)
        return g_hidden, _cast(acc.weight, weight), _cast(acc.bias, bias), None, None, None


def chunked_token_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions, as
    `token_loss_sum(F.linear(hidden, weight, bias), labels)`, without the (B, T, V) logits.

    hidden (B, T, C): last hidden states (after the final norm); weight (V, C): the output projection
    (the embedding when tied; its gradient then adds to the embedding's); labels (B, T) with
    IGNORE_INDEX where no loss is taken. Returns an fp32 scalar. The gradients are computed during this
    call (fused), so it costs a backward's work even if no backward follows; under `torch.no_grad()`
    or with nothing requiring grad it computes the loss alone.
    """
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_tokens, torch.is_grad_enabled())


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probability of each position's next label, (B, T-1) fp32, 0 where the label is ignored:
    `log_softmax(F.linear(hidden, weight, bias))[:, :-1]` gathered at `labels[:, 1:]`, without the
    (B, T, V) logits. Arguments as for `chunked_token_loss_sum`. The backward recomputes each chunk's
    logits from `weight` (see the module docstring for ZeRO-3)."""
    return _LinearTargetLogprobs.apply(hidden, weight, bias, labels, chunk_tokens, torch.is_grad_enabled())


def call_in_engine_forward(engine: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` run as the forward of `engine.module`, through `engine(*args, **kwargs)`.

    A DeepSpeed engine arms ZeRO-3's parameter gathering (and its discovery of parameters read by
    attribute, such as the head weight passed to the chunked losses) only inside its own forward.
    `fn` typically runs the base model to its last hidden states and returns a chunked loss. The same
    redirection as Lightning's and TRL's `_ForwardRedirection`; harmless without ZeRO-3.
    """
    module = engine.module
    had_own = "forward" in module.__dict__
    original = module.forward

    def restore() -> None:
        if had_own:
            module.forward = original
        else:
            module.__dict__.pop("forward", None)

    def forward(*a: Any, **k: Any) -> Any:
        restore()  # before fn runs, so a nested call of the module is its real forward
        return fn(*a, **k)

    module.forward = forward
    try:
        return engine(*args, **kwargs)
    finally:
        restore()
