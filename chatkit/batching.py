"""Batched decoding: several replies advance by one token in one forward, the server's path.

Decoding one token costs a small model little arithmetic and much fixed cost (Python, kernel
launches, reading every weight once), so eight replies decoded together take little longer than one.

Each reply is prefilled alone, exactly as `ChatEngine._decode` does it (so its first token is the one
it gets alone), and joins the running batch between two steps: its KV cache, or the batch's, is padded
on the left to the same width and stacked as a new row. A step feeds every row its last token, with
an attention mask hiding each row's padding and position ids counting only its real tokens, so each
row attends to exactly the keys, at exactly the positions, it would have alone. A row leaves when its
reply ends (eos, a stop string, its max tokens, its cancel event), and cache columns that every
remaining row pads are cut off. Each row keeps its own sampling parameters, seed (its own
`torch.Generator`), stop strings and streaming: tokens go through `ChatEngine.accept` as alone.

Answers equal the ones alone up to floating-point rounding: a batched matmul may add in another order
than a single row's, and masked padding changes the length of attention's sums, which can move logits
in their last bits. A greedy reply changes only where its two best logits tie that closely: in fp32
(~1e-7) none of the replies tests/test_batching.py compares on the tiny GPT-NeoX and Llama models
differed; in bf16 (~1e-2) 5-10% of 48-token replies of those random models did, none of 200 replies
of the trained demo model. A batch of one row without padding makes exactly `_decode`'s calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F

from chatkit.chat import ChatEngine, Decoding, _cache_of, _next_token, sampling_generator


class Sink(Protocol):
    """Where a row's output goes: its reply's pieces as they become certain, or the exception that
    ended it (the server's `Job`)."""

    def put(self, item: str | Exception) -> None: ...


S = TypeVar("S", bound=Sink)


@dataclass(eq=False)
class _Row(Generic[S]):
    job: Decoding
    sink: S
    generator: torch.Generator | None
    last: int
    """The token the next step feeds."""
    length: int
    """Real tokens in the row's cache: the next token's position."""
    pad: int = 0
    """Padding columns before them in the batch's cache."""


def _layers(cache: object) -> list | None:
    """The cache's per-layer key/value holders when every one is a plain growing `DynamicLayer` (the
    rows can be padded and stacked), else None (sliding-window or other layouts: no batching)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return list(layers)


def _edit(cache: object, fn) -> None:
    """Apply `fn` to every layer's keys and values, (batch, heads, columns, head_dim) tensors."""
    for layer in _layers(cache) or ():
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


class BatchDecoder(Generic[S]):
    """The rows decoding together for one engine; the server's worker thread drives it.

    `add` prefills a reply and puts it in the batch, `step` advances every row by one token; both
    return the sinks of the replies that ended (their pieces and any error already put)."""

    def __init__(self, engine: ChatEngine, max_rows: int = 8) -> None:
        if max_rows < 1:
            raise ValueError(f"a batch holds at least one reply, got max_rows={max_rows}")
        self.engine, self.max_rows = engine, max_rows
        self.rows: list[_Row[S]] = []
        self.cache: object | None = None
        self.width = 0
        """Columns in the batch's cache: each row's pad plus its length."""

    def __len__(self) -> int:
        return len(self.rows)

    def accepts(self, job: Decoding) -> bool:
        """Whether `job` can join now: this engine's reply (the same model, eos ids and cache argument),
        decoded on one process (`token_sync` decodes in step with other ranks), and room for it."""
        return job.engine is self.engine and self.engine.token_sync is None and len(self.rows) < self.max_rows

    @torch.no_grad()
    def add(self, job: Decoding, sink: S) -> list[S]:
        """Prefill `job` alone and take its first token; it joins the batch unless it ended already."""
        info, p, e = job.info, job.params, self.engine
        info.prompt_tokens, info.completion_tokens, info.finish_reason = len(job.ids), 0, "length"
        if p.max_new_tokens <= 0 or (job.cancel is not None and job.cancel.is_set()):
            info.finish_reason = "length" if p.max_new_tokens <= 0 else "cancelled"
            return self._finish([_Row(job, sink, None, 0, 0)])
        row = _Row(job, sink, sampling_generator(job.seed), 0, len(job.ids))
        try:
            ids = torch.tensor([job.ids], device=e.device)
            out = e.model(input_ids=ids, use_cache=True, **{e._cache_arg: None}, **e._last_logits_only)
            ended = self._take(row, out.logits[0, -1].cpu())
        except Exception as err:  # reported to this request alone; the batch goes on
            sink.put(err)
            return [sink]
        if ended:
            return self._finish([row])
        try:
            self._join(row, _cache_of(out))
        except Exception as err:  # the batch's cache may be half changed: no row can go on
            return self.abort(err, self.rows + ([] if row in self.rows else [row]))
        return []

    def _join(self, row: _Row[S], cache: object) -> None:
        """Stack the row's cache under the batch's, the narrower one padded on the left. A cache that
        cannot be padded (see `_layers`) runs as a batch of one: `accepts` then admits nobody more."""
        if self.cache is None:
            self.cache, self.width = cache, row.length
            self.rows.append(row)
            if _layers(cache) is None:
                self.max_rows = 1
            return
        if row.length > self.width:
            grow = row.length - self.width
            _edit(self.cache, lambda t: F.pad(t, (0, 0, grow, 0)))
            for r in self.rows:
                r.pad += grow
            self.width = row.length
        row.pad = self.width - row.length
        _edit(cache, lambda t: F.pad(t, (0, 0, row.pad, 0)))
        mine, theirs = _layers(self.cache) or [], _layers(cache) or []
        for a, b in zip(mine, theirs, strict=True):
            a.keys, a.values = torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values])
        self.rows.append(row)

    @torch.no_grad()
    def step(self) -> list[S]:
        """One token for every row (cancelled rows leave first, as alone they stop before a forward)."""
        ended = [r for r in self.rows if r.job.cancel is not None and r.job.cancel.is_set()]
        for r in ended:
            r.job.info.finish_reason = "cancelled"
        done = self._leave(ended)
        if not self.rows:
            return done
        e = self.engine
        ids = torch.tensor([[r.last] for r in self.rows], device=e.device)
        extra = dict(e._last_logits_only)
        if any(r.pad for r in self.rows):  # without padding, the call is `_decode`'s own
            cols = torch.arange(self.width + 1)
            pads = torch.tensor([[r.pad] for r in self.rows])
            extra["attention_mask"] = (cols >= pads).long().to(e.device)  # (B, width + 1)
            extra["position_ids"] = torch.tensor([[r.length] for r in self.rows], device=e.device)
        try:
            out = e.model(input_ids=ids, use_cache=True, **{e._cache_arg: self.cache}, **extra)
        except Exception as err:  # the forward itself failed: every row fails with it
            return done + self.abort(err)
        self.cache, self.width = _cache_of(out), self.width + 1
        logits = out.logits[:, -1].cpu()  # (B, V)
        finished, failed = [], []
        for i, r in enumerate(self.rows):
            r.length += 1
            try:
                if self._take(r, logits[i]):
                    finished.append(r)
            except Exception as err:  # e.g. non-finite logits: this row alone fails
                r.sink.put(err)
                failed.append(r)
        return done + self._leave(finished, failed)

    def abort(self, err: Exception, rows: Sequence[_Row[S]] | None = None) -> list[S]:
        """Fail every row (or `rows`) with `err` and empty the batch: what a failed forward, or a
        cache that could not be joined, leaves no row able to go on from."""
        rows = list(self.rows) if rows is None else rows
        for r in rows:
            r.sink.put(err)
        self.rows, self.cache, self.width = [], None, 0
        return [r.sink for r in rows]

    def _take(self, row: _Row[S], logits: torch.Tensor) -> bool:
        """Pick the row's next token and put its text; True when the reply has ended."""
        p, info = row.job.params, row.job.info
        row.last = _next_token(logits, p, row.generator)
        piece, ended = self.engine.accept(row.last, row.job.reply, info)
        if piece:
            row.sink.put(piece)
        return ended or info.completion_tokens >= p.max_new_tokens

    def _leave(self, rows: list[_Row[S]], failed: Sequence[_Row[S]] = ()) -> list[S]:
        """Take ended rows (and failed ones, whose error is put already) out of the batch and its
        cache; cut the columns all the others pad."""
        if not rows and not failed:
            return []
        gone = {id(r) for r in [*rows, *failed]}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.width = None, 0
        else:
            index = torch.tensor(keep)
            cut = min(r.pad for r in self.rows)
            _edit(self.cache, lambda t: t[index.to(t.device), :, cut:])
            for r in self.rows:
                r.pad -= cut
            self.width -= cut
        return self._finish(rows) + [r.sink for r in failed]

    def _finish(self, rows: list[_Row[S]]) -> list[S]:
        """Put what each reply still held back (`ReplyAssembler.finish`); their sinks are done."""
        for r in rows:
            try:
                piece = r.job.reply.finish()
            except Exception as err:
                r.sink.put(err)
                continue
            if piece:
                r.sink.put(piece)
        return [r.sink for r in rows]
