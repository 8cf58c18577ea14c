"""Mixing and packing as arrays: which examples an epoch draws, and how they fill rows.

Everything here is numpy over whole epochs, because the plan is made on every rank at every epoch:
for 10M conversations the Python loops this replaced (lists of (file, example) tuples, a best-fit
loop per item) took over a minute and 2 GB per rank; these take seconds and a few hundred MB
(bench/load_memory.py measures it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

ITEM_BITS = 40
"""epoch_order packs (file, example) into one int64: up to 2**40 examples a file, 2**23 files."""


def epoch_order(
    sizes: Sequence[int], weights: Sequence[float] | None, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(files, examples): the file and the example of each draw of one epoch, shuffled.

    Without weights every example appears once. With weights an epoch has sum(sizes) examples and file
    i contributes round(sum(sizes) * w_i / sum(w)) of them: a shuffled pass over the file, repeated if
    it is over-sampled, cut short if under-sampled. Arrays, not a list of (file, example) tuples: 10M
    draws take 120 MB instead of about 1.5 GB.
    """
    rng = np.random.default_rng([epoch, seed % (1 << 64)])
    total = sum(sizes)
    counts = list(sizes) if weights is None else [round(total * w / sum(weights)) for w in weights]
    counts = [n if size else 0 for size, n in zip(sizes, counts, strict=True)]
    draws = np.empty(sum(counts), np.int64)  # file << ITEM_BITS | example: one array shuffled in place
    at = 0
    for i, (size, n) in enumerate(zip(sizes, counts, strict=True)):
        if n == 0:
            continue
        passes = -(-n // size)  # shuffled passes over the file, the last one cut short
        ids = np.broadcast_to(np.arange(size), (passes, size))
        draws[at : at + n] = (
            rng.permuted(ids, axis=1).ravel()[:n] if passes > 1 else rng.permutation(size)[:n]
        )
        draws[at : at + n] |= i << ITEM_BITS
        at += n
    rng.shuffle(draws)
    files = (draws >> ITEM_BITS).astype(np.int32)
    draws &= (1 << ITEM_BITS) - 1
    return files, draws


def pack_rows(lengths: Sequence[int] | np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing, as arrays (items, starts): row r holds items[starts[r]:starts[r+1]], in the
    order they were placed.

    Each item (longest first, equal lengths in index order) goes into the open row with the least room
    that still fits it (among equals, the one that last received an item), else into a new row. Items
    of one length go in bulk: a row with room r takes r // n of them in turn, since after each it is
    still the tightest fit. The Python work is per (length, room) pair met, not per item: 10M items in
    seconds, where a loop over items took minutes. Lengths must be positive.
    """
    lengths = np.asarray(lengths)
    if not np.issubdtype(lengths.dtype, np.integer):
        lengths = lengths.astype(np.int64)
    if len(lengths) and (bad := np.flatnonzero((lengths > capacity) | (lengths < 1))).size:
        i, n = int(bad[0]), int(lengths[bad[0]])
        why = f"more than the row capacity {capacity}" if n > capacity else "nothing to pack"
        raise ValueError(f"example {i} has {n} tokens, {why}")
    order = np.argsort(-lengths, kind="stable")  # placement order
    row_of = np.empty(len(lengths), np.int32 if len(lengths) < 1 << 31 else np.int64)
    rooms = _Rooms(capacity)
    placed = 0
    per_length = np.bincount(lengths, minlength=capacity + 1) if len(lengths) else np.zeros(1, np.int64)
    for n in np.flatnonzero(per_length)[::-1].tolist():
        c = int(per_length[n])
        rooms.place(n, order[placed : placed + c], row_of)
        placed += c
    rows_in_order = row_of[order]
    del row_of
    starts = np.zeros(rooms.rows + 1, np.int64)
    np.cumsum(np.bincount(rows_in_order, minlength=rooms.rows), out=starts[1:])
    by_row = np.argsort(rows_in_order, kind="stable")
    del rows_in_order
    return order[by_row], starts


class _Rooms:
    """pack_rows' open rows: per remaining room a stack of row ids (chunks of an array; the top is the
    last id of the last chunk)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.stacks: list[list[np.ndarray]] = [[] for _ in range(capacity + 1)]
        self.count = np.zeros(capacity + 1, np.int64)
        self.rows = 0

    def push(self, room: int, rows: np.ndarray) -> None:
        """`rows`, in the order they were filled, now have `room` left (a full row is forgotten)."""
        if room > 0 and len(rows):
            self.stacks[room].append(rows)
            self.count[room] += len(rows)

    def place(self, n: int, items: np.ndarray, row_of: np.ndarray) -> None:
        """Put `items`, each of length n, where best fit puts them one by one (row_of[item] = row)."""
        done, left = 0, len(items)
        for room in (np.flatnonzero(self.count[n:]) + n).tolist():  # rows only move below n meanwhile
            top_first = np.concatenate(self.stacks[room])[::-1]
            per = room // n
            full = min(len(top_first), left // per)
            row_of[items[done : done + full * per]] = np.repeat(top_first[:full], per)
            done, left = done + full * per, left - full * per
            taken = full
            self.stacks[room], self.count[room] = [], 0
            self.push(room - per * n, top_first[:full])
            if left and full < len(top_first):  # the next row takes the rest and stays open
                row_of[items[done:]] = top_first[full]
                self.push(room - left * n, top_first[full : full + 1])
                taken, done, left = full + 1, done + left, 0
            self.push(room, top_first[taken:][::-1])
            if not left:
                return
        per = self.capacity // n
        new = np.arange(self.rows, self.rows + -(-left // per))
        self.rows += len(new)
        row_of[items[done:]] = np.repeat(new, per)[:left]
        full = left // per
        self.push(self.capacity - per * n, new[:full])
        if left % per:
            self.push(self.capacity - left % per * n, new[full:])


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """`pack_rows` as a list of rows, each a list of item indices."""
    items, starts = pack_rows(lengths, capacity)
    flat = items.tolist()
    return [flat[a:b] for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True)]


@dataclass(frozen=True)
class RowPlan:
    """One epoch's rows, the same on every rank: row r holds the examples (files[k], items[k]) for k in
    starts[r]:starts[r+1]. Arrays rather than lists of tuples (10M examples: ~150 MB, not ~2 GB);
    indexing gives a row as [(file, example), ...], slicing a list of rows."""

    files: np.ndarray
    items: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    def row(self, r: int) -> list[tuple[int, int]]:
        a, b = int(self.starts[r]), int(self.starts[r + 1])
        return list(zip(self.files[a:b].tolist(), self.items[a:b].tolist(), strict=True))

    def __getitem__(self, r: int | slice) -> list[tuple[int, int]] | list[list[tuple[int, int]]]:
        if isinstance(r, slice):
            return [self.row(k) for k in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(f"row {r} of {len(self)}")
        return self.row(r % len(self))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self.row(k) for k in range(len(self)))
