"""Attention over packed rows without a (T, T) mask: the `varlen` implementation, and the forward
arguments that keep the conversations of a packed row apart under every implementation.

A packed row holds several conversations whose positions restart at 0 (chatkit.data.collate_rows);
each padding token has position 0 too, so it is a sequence of its own. Positions are all any
implementation needs to find the sequences:

- `varlen` (registered here): per sequence, `scaled_dot_product_attention(is_causal=True)` on its
  slice of q/k/v. Neither chatkit nor transformers builds a mask (its mask function returns None),
  and PyTorch's flash kernels (CPU and CUDA) never hold a (T, T) score matrix, so memory is linear
  in the row's length. With attention dropout PyTorch falls back to its math kernel, quadratic in
  the longest *conversation* (not the row).
- `sdpa`, `eager`, `flex_attention`: no mask is passed; transformers detects the restarting
  positions (`masking_utils.find_packed_sequence_indices`) and builds the block-diagonal mask
  itself: dense (B, 1, T, T) for sdpa (boolean) and eager (float), block-sparse for flex.
- `flash_attention_2`: transformers reads packed sequences from position_ids only for a batch of
  one row, so the cumulative lengths over the flattened (B * T) tokens are passed as FA2's
  `cu_seq_lens_q/k` (its padding-free path).

A KV cache (generation) or a padding mask turns the packed detection off everywhere; `varlen` then
computes exactly what `sdpa` does, so a model trained with it generates as usual.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

VARLEN = "varlen"
IMPLEMENTATIONS = ("varlen", "sdpa", "eager", "flex_attention", "flash_attention_2")
"""Values of TrainConfig.attention, each a transformers `attn_implementation`."""


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions -> int32 (S + 1,) cumulative sequence lengths over the flattened B * T tokens.

    A sequence starts at every row start and wherever a position is not its predecessor's plus one:
    the rule of transformers' `find_packed_sequence_indices`, so every implementation splits alike."""
    b, t = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    idx = starts.reshape(-1).nonzero().reshape(-1)
    end = torch.tensor([b * t], device=idx.device)
    return torch.cat([idx, end]).to(torch.int32)


def _row_segments(bounds: list[int], row: int, t: int) -> list[tuple[int, int]]:
    """The (start, end) of each sequence of `row`, relative to it, from flattened cumulative lengths."""
    lo, hi = row * t, (row + 1) * t
    cuts = [c - lo for c in bounds if lo <= c <= hi]
    return list(zip(cuts[:-1], cuts[1:], strict=False))


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(1, Hkv, n, D) -> (1, Hkv * n_rep, n, D): query head h reads key/value head h // n_rep (as SDPA's
    enable_gqa and transformers' repeat_kv do)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _attend_row(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[tuple[int, int]], **opts: Any
) -> torch.Tensor:
    """One row's attention, sequence by sequence: q (1, H, T, D), k/v (1, Hkv, T, D) -> (1, H, T, D).

    A run of one-token sequences (padding) takes its value rows as they are (softmax over one key is
    1), without one SDPA call per token and without dropout: no trained token reads them."""
    n_rep = q.size(1) // k.size(1)
    pieces, single_from = [], None
    for s, e in segments:
        if e - s == 1:
            single_from = s if single_from is None else single_from
            continue
        if single_from is not None:
            pieces.append(_repeat_heads(v[:, :, single_from:s], n_rep))
            single_from = None
        pieces.append(_attend_sequence(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], n_rep, **opts))
    if single_from is not None:
        pieces.append(_repeat_heads(v[:, :, single_from:], n_rep))
    return torch.cat(pieces, dim=2)


def _attend_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_rep: int,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One sequence's attention. SDPA's fused kernel when it computes what the model does; with logit
    soft-capping (Gemma 2) or a sliding window shorter than the sequence (Gemma 2's local layers, a
    Mistral with `sliding_window`), the same math as transformers' eager attention, on this sequence's
    (n, n) scores only: quadratic in the conversation, never in the packed row."""
    n = q.size(2)
    if softcap is None and (window is None or n <= window):
        return F.scaled_dot_product_attention(
            q, k, v, enable_gqa=n_rep > 1, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    k, v = _repeat_heads(k, n_rep), _repeat_heads(v, n_rep)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.size(-1) ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(n, device=q.device)
    allowed = i[:, None] >= i[None, :] if is_causal else torch.ones(n, n, dtype=torch.bool, device=q.device)
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)  # transformers' sliding window: q - k < window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")).float(), dim=-1).to(q.dtype)
    return F.dropout(probs, p=dropout_p, training=dropout_p > 0) @ v


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention per packed sequence: query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), None
    (the signature and layout of transformers' `sdpa_attention_forward`).

    Sequences come from `cu_seq_lens_q` (packed_forward_kwargs passes it, computed once per forward)
    or else from `position_ids`. With a mask or a KV cache (q and k lengths differ) this is sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, _, t, _ = query.shape
    if attention_mask is not None or key.shape[2] != t:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        positions = kwargs.get("position_ids")
        bounds = cu_seqlens(positions.expand(b, -1)) if positions is not None else torch.arange(b + 1) * t
    bounds = bounds.tolist()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    opts = {
        "dropout_p": dropout, "is_causal": causal, "scale": scaling,
        "softcap": kwargs.get("softcap"), "window": kwargs.get("sliding_window"),
    }  # fmt: skip
    rows = [
        _attend_row(query[r : r + 1], key[r : r + 1], value[r : r + 1], _row_segments(bounds, r, t), **opts)
        for r in range(b)
    ]
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask for `varlen` (the sequences come from positions); sdpa's mask where sdpa would run:
    with a padding mask or a KV cache (kv_length differs from q_length)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, attention_mask=attention_mask, **kwargs,
    )  # fmt: skip


@functools.cache
def register() -> None:
    """Make `varlen` a transformers attention implementation (idempotent; chatkit.train imports call it
    before loading a model with attn_implementation="varlen")."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)


def check_available(implementation: str, device: torch.device) -> None:
    """Raise one clear line when training with `implementation` cannot run on `device` (before
    transformers' or PyTorch's longer errors, which come only at the first forward or backward)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
    if implementation == "flex_attention" and device.type == "cpu":
        raise ValueError(
            "attention=flex_attention has no backward pass on CPU in PyTorch; use attention=varlen "
            "(padding-free) or sdpa"
        )
    if implementation == "flash_attention_2":
        import importlib.util

        if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "attention=flash_attention_2 needs a CUDA GPU and the flash-attn package; "
                "attention=varlen is padding-free on any device"
            )


def load_kwargs(implementation: str, device: torch.device) -> dict[str, str]:
    """`from_pretrained` arguments selecting `implementation` (registered first when it is varlen)."""
    check_available(implementation, device)
    register()
    return {"attn_implementation": implementation}


def packed_forward_kwargs(position_ids: torch.Tensor, implementation: str) -> dict[str, Any]:
    """Forward arguments that keep packed sequences apart under `implementation` without a dense mask
    from chatkit: restarting positions, no attention mask, no KV cache (either would turn
    transformers' packed detection off), plus the cumulative lengths varlen and FA2 read."""
    kwargs: dict[str, Any] = {"attention_mask": None, "position_ids": position_ids, "use_cache": False}
    if implementation == VARLEN:  # on the host: varlen slices with Python ints, no device sync per layer
        kwargs["cu_seq_lens_q"] = cu_seqlens(position_ids.cpu())
    elif implementation.startswith("flash_attention"):
        cu = cu_seqlens(position_ids)
        longest = int((cu[1:] - cu[:-1]).max())
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kwargs
