"""Training data: conversation JSONL -> cached token arrays -> weighted mixture -> packed micro-batches.

- Tokenization runs in several processes and is cached on disk under a key made from the source
  file's bytes, the tokenizer, the template and this code's source (chatkit.token_store: memory-mapped
  columns, so a rank's memory does not grow with the data set). chatkit.launch fills the cache before
  the ranks start; the ranks only map it.
- Conversations longer than `max_length` are dropped or truncated by whole turns, as the recipe says;
  every one is counted.
- A mixture lists files with weights (`path:weight`, OpenChatKit's form); each epoch draws from every
  file in proportion to its weight.
- Packing puts whole conversations into rows of `max_length` by best fit, in numpy: an epoch's plan of
  10M conversations takes seconds and a few hundred MB (`Batches.rows`). Every token carries the id
  of its conversation (segment) and its position within it, and attention is block-diagonal, so no
  packed conversation attends to another: packed and unpacked losses are equal.
- Preference data (DPO and its relatives) is the same machinery with a pair as the unit: the chosen and
  the rejected sequence are stored one after the other, travel together into one row, and are two
  documents there (two segments) that never attend to each other; several pairs pack into one row.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from chatkit.conversation import (
    ConversationError,
    Message,
    Preference,
    decode_line,
    parse_line,
    parse_preference_line,
)
from chatkit.io import write_json
from chatkit.packing import RowPlan, epoch_order, pack_rows
from chatkit.packing import pack_best_fit as pack_best_fit  # where callers have always found it
from chatkit.token_store import StoreWriter, open_store, release, source_digest
from chatkit.tokenization import IGNORE_INDEX, Encoded, encode_conversation

CHUNK = 512  # conversations per worker task
OUTCOMES = ("ok", "truncated", "too_long", "untrained", "empty_message")
PAIR_OUTCOMES = ("ok", "too_long", "untrained", "empty_message", "identical_replies")


@dataclass(frozen=True)
class DataSource:
    path: str
    weight: float | None = None

    @classmethod
    def parse(cls, spec: str) -> DataSource:
        """`file.jsonl` or `file.jsonl:0.5` (a trailing number after the last colon is a weight)."""
        path, sep, tail = spec.rpartition(":")
        if sep:
            try:
                return cls(path, float(tail))
            except ValueError:
                pass
        return cls(spec, None)


class Pair(NamedTuple):
    """A preference pair as token sequences, with the reference model's log-probabilities of both
    replies when the loss needs them (0.0 otherwise)."""

    chosen: Encoded
    rejected: Encoded
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


@dataclass
class TokenizedSet:
    """One file's sequences as flat arrays: sequence i is tokens[offsets[i]:offsets[i+1]].

    A conversation file's examples are its sequences. A preference file (`pairs`) stores each pair's
    chosen and rejected sequences one after the other; its examples are pairs (2 sequences each).
    Loaded from the cache, the arrays are read-only memory maps (chatkit.token_store)."""

    tokens: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    stats: dict[str, int] = field(default_factory=dict)
    pairs: bool = False
    key: str = ""
    """The cache key (source bytes, tokenizer, template, settings): names derived caches."""
    reference: np.ndarray | None = None
    """Preference sets: (pairs, 2) reference log-probabilities of (chosen, rejected), once computed."""
    example_lengths: np.ndarray | None = field(default=None, repr=False)
    """Tokens per example, as the store keeps them; computed from `offsets` when not given."""

    def __len__(self) -> int:
        n = len(self.offsets) - 1
        return n // 2 if self.pairs else n

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (a pair's two sequences together: they share a row)."""
        if self.example_lengths is None:
            d = np.diff(self.offsets).astype(np.int32)
            self.example_lengths = d[0::2] + d[1::2] if self.pairs else d
        return self.example_lengths

    def sequence(self, i: int) -> Encoded:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.tokens[a:b]
        return Encoded(ids.tolist(), np.where(self.trained[a:b], ids, IGNORE_INDEX).tolist())

    def release(self) -> None:
        """Unmap the cached columns' pages read so far (chatkit.token_store.release); no-op in memory."""
        for column in (self.tokens, self.trained, self.offsets, self.example_lengths):
            release(column)

    def example(self, i: int) -> Encoded | Pair:
        if not self.pairs:
            return self.sequence(i)
        ref = (0.0, 0.0) if self.reference is None else tuple(float(x) for x in self.reference[i])
        return Pair(self.sequence(2 * i), self.sequence(2 * i + 1), *ref)


# ---------------------------------------------------------------- tokenization


def fit_conversation(
    tokenizer, template, messages: Sequence[Message], max_length: int, overlong: str, tools=None
):
    """Encode; if too long, drop it or keep the longest prefix ending in an assistant turn that fits.

    Returns (Encoded or None, outcome) with outcome one of ok, truncated, too_long, untrained,
    empty_message (a message with no text and no tool call: almost always a conversion bug upstream).
    `tools` are the conversation's function schemas, rendered by the template.
    """
    if any(m.is_empty for m in messages):
        return None, "empty_message"
    reach = _within_reach(messages, max_length * longest_piece(tokenizer))
    if reach is None or (len(reach) < len(messages) and overlong != "truncate"):
        return None, "too_long"
    enc = encode_conversation(tokenizer, template, reach, tools)
    outcome = "ok"
    if len(reach) < len(messages) or len(enc.input_ids) > max_length:
        if overlong != "truncate":
            return None, "too_long"
        ends = [i for i, m in enumerate(reach) if m.role == "assistant" and i < len(messages) - 1]
        for end in reversed(ends):
            enc = encode_conversation(tokenizer, template, reach[: end + 1], tools)
            if len(enc.input_ids) <= max_length:
                outcome = "truncated"
                break
        else:
            return None, "too_long"
    if enc.num_trained == 0:
        return None, "untrained"
    return enc, outcome


def fit_pair(tokenizer, template, pref: Preference, max_length: int):
    """Encode both replies after the prompt; (Pair or None, outcome). A pair is kept whole or dropped:
    chosen and rejected share a row, so together they must fit in `max_length` (a pair is never cut:
    a shortened prompt would change what the replies answer)."""
    if any(m.is_empty for m in (*pref.prompt, pref.chosen, pref.rejected)):
        return None, "empty_message"
    if pref.chosen.content == pref.rejected.content:
        return None, "identical_replies"  # no preference to learn, and a zero margin forever
    chosen, rejected = pref.sequences()
    chars = sum(len(m.content) for m in (*chosen, *rejected))
    if chars > max_length * longest_piece(tokenizer):
        return None, "too_long"
    pair = Pair(*(encode_conversation(tokenizer, template, m, pref.tools) for m in (chosen, rejected)))
    if len(pair.chosen.input_ids) + len(pair.rejected.input_ids) > max_length:
        return None, "too_long"
    if pair.chosen.num_trained == 0 or pair.rejected.num_trained == 0:
        return None, "untrained"
    return pair, "ok"


def longest_piece(tokenizer) -> int:
    """Characters the longest vocabulary entry can stand for (an upper bound: byte-level pieces hold
    one character per byte, sentencepiece's byte pieces `<0xNN>` six characters for one byte)."""
    cached = getattr(tokenizer, "_chatkit_longest_piece", None)
    if cached is None:
        cached = max((len(t) for t in tokenizer.get_vocab()), default=1)
        tokenizer._chatkit_longest_piece = cached
    return cached


def _within_reach(messages: Sequence[Message], max_chars: int) -> list[Message] | None:
    """The messages before the first one that ends past `max_chars` characters of content: no token
    sequence of max_length tokens can hold more, so those never need tokenizing. This bounds the work
    (and memory) per row before any tokenizer runs: a 50 MB row costs a length check, not 20 GB."""
    total = 0
    for i, m in enumerate(messages):
        total += len(m.content)
        if total > max_chars:
            return list(messages[:i]) or None
    return list(messages)


_WORKER: dict = {}


def _init_worker(tokenizer, template, max_length: int, overlong: str, pairs: bool = False) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(
        tokenizer=tokenizer, template=template, max_length=max_length, overlong=overlong, pairs=pairs
    )


def _encode_line(line: str, where: str) -> tuple[list[Encoded], str]:
    """One JSONL line -> its sequences (one conversation, or a pair's two) and the outcome."""
    w = _WORKER
    if w["pairs"]:
        pair, outcome = fit_pair(
            w["tokenizer"], w["template"], parse_preference_line(line, where), w["max_length"]
        )
        return ([pair.chosen, pair.rejected] if pair else []), outcome
    conv = parse_line(line, where)
    enc, outcome = fit_conversation(
        w["tokenizer"], w["template"], conv.messages, w["max_length"], w["overlong"], conv.tools
    )
    return ([enc] if enc else []), outcome


def _tokenize_chunk(args: tuple[str, int, list[str]]):
    path, first_line, lines = args
    ids: list[int] = []
    trained: list[bool] = []
    lengths: list[int] = []
    stats = dict.fromkeys(PAIR_OUTCOMES if _WORKER["pairs"] else OUTCOMES, 0)
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        encoded, outcome = _encode_line(line, f"{path}:{first_line + k}")
        stats[outcome] += 1
        for enc in encoded:
            ids += enc.input_ids
            trained += [label != IGNORE_INDEX for label in enc.labels]
            lengths.append(len(enc.input_ids))
    return np.array(ids, np.int32), np.array(trained, np.bool_), np.array(lengths, np.int64), stats


def _chunks(path: str) -> Iterator[tuple[str, int, list[str]]]:
    """CHUNK lines at a time; a line that is not UTF-8 is an error naming its file and line."""
    with open(path, "rb") as f:
        batch: list[str] = []
        first = 1
        for lineno, raw in enumerate(f, 1):
            batch.append(decode_line(raw, f"{path}:{lineno}", lineno == 1))
            if len(batch) == CHUNK:
                yield path, first, batch
                batch, first = [], lineno + 1
        if batch:
            yield path, first, batch


def _fingerprint(
    path: str, tokenizer, template, max_length: int, overlong: str, pairs: bool, cache: Path
) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(source_digest(path, cache).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(repr(sorted(tokenizer.all_special_tokens)).encode())
    h.update(f"{template.name}\0{template.chat_template}\0{max_length}\0{overlong}\0{pairs}".encode())
    here = Path(__file__).parent
    templates = sorted((here / "templates").glob("*.py"))
    code = ("data.py", "token_store.py", "tokenization.py", "conversation.py")
    for module in (*(here / name for name in code), *templates):
        h.update(module.read_bytes())
    return h.hexdigest()


def _in_workers(chunks: Iterator[tuple[str, int, list[str]]], procs: int, init: tuple):
    """Tokenized chunks in order, from `procs` processes, with at most 2 x procs chunks in flight (the
    file is never read ahead into memory). A worker that dies (the OOM killer) stops the run with a
    message naming the lines in flight then; `multiprocessing.Pool` would wait for its result forever.
    (The pool fails every unfinished chunk alike, so which of them the dead worker had is not known.)"""
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(procs, mp_context=ctx, initializer=_init_worker, initargs=init) as pool:
        in_flight: deque = deque()
        futures: deque = deque()
        try:
            for chunk in chunks:
                in_flight.append(chunk)
                futures.append(pool.submit(_tokenize_chunk, chunk))
                if len(futures) >= 2 * procs:
                    yield _next_result(futures, in_flight)
            while futures:
                yield _next_result(futures, in_flight)
        except BrokenProcessPool:
            first, last = in_flight[0], in_flight[-1]
            raise ConversationError(
                f"{first[0]}:{first[1]}-{last[1] + len(last[2]) - 1}: a tokenizer process died while tokenizing "
                "these lines (killed by the system, most likely for memory); tokenize_procs=1 shows which row"
            ) from None


def _next_result(futures: deque, in_flight: deque):
    result = futures[0].result()
    futures.popleft()
    in_flight.popleft()
    return result


def default_cache_dir() -> Path:
    return Path(os.environ.get("CHATKIT_CACHE", Path.home() / ".cache" / "chatkit")) / "tokenized"


@dataclass(frozen=True)
class CacheEntry:
    """Where one file's tokenization is cached, and under which key."""

    source: str
    path: Path
    key: str
    pairs: bool

    @classmethod
    def of(
        cls,
        source: str,
        tokenizer,
        template,
        max_length: int,
        overlong: str = "drop",
        cache_dir: str | Path | None = None,
        pairs: bool = False,
    ) -> CacheEntry:
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        key = _fingerprint(source, tokenizer, template, max_length, overlong, pairs, cache)
        return cls(source, cache / f"{Path(source).stem}-{key}", key, pairs)

    @property
    def failed(self) -> Path:
        """Where a rank that tokenized this file and failed leaves its one-line reason
        (chatkit.train.data.load_sets: the ranks waiting for the entry read it)."""
        return self.path.with_name(f"{self.path.name}.failed")

    def load(self) -> TokenizedSet | None:
        """The cached set, memory-mapped; None when the cache lacks it (or held a damaged copy)."""
        store = open_store(self.path)
        if store is None:
            return None
        return TokenizedSet(
            store.tokens, store.trained, store.offsets, store.stats, self.pairs, self.key,
            example_lengths=store.lengths,
        )  # fmt: skip


def tokenize_file(
    path: str,
    tokenizer,
    template,
    max_length: int,
    overlong: str = "drop",
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    pairs: bool = False,
) -> TokenizedSet:
    """Tokenize one conversation JSONL file, or with `pairs` one preference file, into the cache (or
    find it there); the set returned maps the cache's files."""
    entry = CacheEntry.of(path, tokenizer, template, max_length, overlong, cache_dir, pairs)
    cached = entry.load()
    if cached is not None:
        return cached
    write_entry(entry, tokenizer, template, max_length, overlong, num_proc, show_progress)
    loaded = entry.load()
    if loaded is None:
        raise OSError(f"{entry.path}: the tokenization cache entry just written cannot be read back")
    return loaded


def write_entry(
    entry: CacheEntry,
    tokenizer,
    template,
    max_length: int,
    overlong: str = "drop",
    num_proc: int = 1,
    show_progress: bool = True,
) -> dict[str, int]:
    """Tokenize `entry.source` into the cache, a chunk of lines at a time (memory stays at a few
    chunks whatever the file's size); returns the count of each outcome."""
    pairs = entry.pairs
    unit = " pair" if pairs else " conv"
    bar = tqdm(desc=f"tokenize {entry.source}", unit=unit, disable=not show_progress, leave=False)
    stats = dict.fromkeys(PAIR_OUTCOMES if pairs else OUTCOMES, 0)
    chunks = _chunks(entry.source)
    init = (tokenizer, template, max_length, overlong, pairs)
    if num_proc > 1:
        parts = _in_workers(chunks, num_proc, init)
    else:
        _init_worker(*init)
        parts = map(_tokenize_chunk, chunks)
    with StoreWriter(entry.path, pairs) as store:
        for ids, trained, lengths, counts in parts:
            store.add(ids, trained, lengths)
            for k, v in counts.items():
                stats[k] += v
            bar.update(sum(counts.values()))
        store.finish(stats)
    bar.close()
    return stats


def describe(path: str, s: TokenizedSet, max_length: int) -> str:
    st = s.stats
    if s.pairs:
        return (
            f"{path}: {len(s)} preference pairs kept, dropped {st.get('too_long', 0)} whose replies together "
            f"exceed {max_length} tokens, {st.get('identical_replies', 0)} with identical replies, "
            f"{st.get('untrained', 0)} with nothing trained and {st.get('empty_message', 0)} with an empty message"
        )
    return (
        f"{path}: {len(s)} conversations kept ({st.get('truncated', 0)} truncated by whole turns), "
        f"dropped {st.get('too_long', 0)} over {max_length} tokens, {st.get('untrained', 0)} with nothing "
        f"trained and {st.get('empty_message', 0)} with an empty message"
    )


# ---------------------------------------------------------------- mixing and packing


def collate_rows(rows: Sequence[Sequence[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole conversations -> input_ids, labels, position_ids, segment_ids (B, T).

    Positions restart at 0 for every conversation. The first token of each conversation is never a
    target (nothing before it in its own conversation predicts it). Padding gets segment -1-t, a
    segment of its own per position, so its attention rows are never empty.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = -1 - torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at : at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE_INDEX
            pos[r, at : at + n] = torch.arange(n)
            seg[r, at : at + n] = s
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg}


def collate_pairs(rows: Sequence[Sequence[Pair]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole preference pairs -> collate_rows' tensors for their sequences (each pair's chosen
    then rejected, two segments), plus `sequence_ids` (B, T): 2k on pair k's chosen tokens, 2k+1 on its
    rejected ones, -1 on padding; `reference` (P, 2) and `pair_weight` (P,): 0 for a filler pair whose
    labels are all ignored (evaluation shards are padded with one), 1 otherwise."""
    batch = collate_rows([[e for p in row for e in (p.chosen, p.rejected)] for row in rows], pad_id)
    seq = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for p in row:
            for side, e in enumerate((p.chosen, p.rejected)):
                seq[r, at : at + len(e.input_ids)] = 2 * k + side
                at += len(e.input_ids)
            k += 1
    pairs = [p for row in rows for p in row]
    batch["sequence_ids"] = seq
    batch["reference"] = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float64)
    batch["pair_weight"] = torch.tensor([float(p.chosen.num_trained > 0) for p in pairs])
    return batch


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) segment ids -> additive (B, 1, T, T) mask: 0 where a token may attend, dtype-min elsewhere.

    A float mask (not boolean) because transformers' eager attention ignores boolean 4D masks.
    Training and evaluation no longer build it (at 32K tokens it is 4 GiB per row in fp32): the
    attention implementation keeps packed conversations apart from the restarting positions
    (chatkit.train.attention). It stays as the independent reference, built from segment ids, that
    tests compare those paths with, and as the dense competitor in bench/long_context.py.
    """
    t = segment_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class Batches:
    """Per-epoch micro-batches for one rank, identical in number on every rank."""

    sets: list[TokenizedSet]
    weights: list[float] | None
    micro_batch_size: int
    max_length: int
    pack: bool
    rank: int
    world_size: int
    seed: int
    pad_id: int
    collate: Callable[[Sequence[Sequence[Encoded]], int], dict[str, torch.Tensor]] = collate_rows
    """The training method's collate (chatkit.train.method)."""
    _plan: tuple[int, RowPlan] | None = field(default=None, init=False, repr=False, compare=False)

    def rows(self, epoch: int) -> RowPlan:
        """The epoch's rows: its draws (`epoch_order`), packed (`pack_rows`) and shuffled. The last
        epoch's plan is kept (steps_per_epoch, the stream and the reference pass ask for one epoch
        several times); older ones are dropped, so memory holds one plan whatever the epoch count."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._make_plan(epoch))
        return self._plan[1]

    def _make_plan(self, epoch: int) -> RowPlan:
        files, items = epoch_order([len(s) for s in self.sets], self.weights, self.seed, epoch)
        if not self.pack:
            return RowPlan(files, items, np.arange(len(items) + 1, dtype=np.int64))
        lengths = np.empty(len(items), np.int32)
        for f, s in enumerate(self.sets):
            mine = files == f
            lengths[mine] = s.lengths[items[mine]]
        order, starts = pack_rows(lengths, self.max_length)
        del lengths
        shuffle = np.random.default_rng([epoch, self.seed % (1 << 64), 7919]).permutation(len(starts) - 1)
        sizes = np.diff(starts)[shuffle]
        new_starts = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=new_starts[1:])
        take = np.repeat(starts[:-1][shuffle] - new_starts[:-1], sizes)
        take += np.arange(new_starts[-1])  # position k of new row r: old row's start + (k - new start)
        take = order[take]
        return RowPlan(files[take], items[take], new_starts)

    def steps_per_epoch(self, accumulation: int) -> int:
        return len(self.rows(0)) // (self.micro_batch_size * self.world_size * accumulation)

    def stream(self, skip: int = 0, accumulation: int = 1) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Endless (epoch, batch); rank r takes every world_size-th slice of micro_batch_size rows.

        Step N of an epoch reads its rows N*G..(N+1)*G (G = micro_batch_size x world_size x
        `accumulation`, the global batch) and an epoch ends after its last whole step, so the rows of a
        step depend on G alone, not on how it is split: a run resumed on other ranks with the same G
        continues on the same rows (chatkit.train.universal). `skip` micro-batches are passed over
        without being built: a resumed run continues exactly where the interrupted one stopped, since
        every epoch's order depends only on seed and epoch.
        """
        mbs = self.micro_batch_size
        per = mbs * self.world_size
        epoch = 0
        while True:
            plan = self.rows(epoch)
            if len(plan) < per * accumulation:
                raise ValueError(
                    f"{len(plan)} rows cannot fill one batch of {per * accumulation} across ranks"
                )
            count = len(plan) // (per * accumulation) * accumulation
            if skip >= count:
                skip -= count
                epoch += 1
                continue
            for b in range(skip, count):
                first = b * per + self.rank * mbs
                rows = [plan.row(r) for r in range(first, first + mbs)]
                batch = self.collate([[self.sets[f].example(j) for f, j in row] for row in rows], self.pad_id)
                for s in self.sets:
                    s.release()  # the batch is copied out: keep the rank's RSS off the mapped store
                yield epoch, batch
            skip = 0
            epoch += 1


def save_data_stats(path: Path, sources: Sequence[DataSource], sets: Sequence[TokenizedSet]) -> None:
    write_json(
        path,
        {s.path: {"weight": s.weight, "kept": len(t), **t.stats} for s, t in zip(sources, sets, strict=True)},
    )
