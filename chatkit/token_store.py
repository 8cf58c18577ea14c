"""The tokenized-data cache on disk: one folder per tokenized file, memory-mapped by every rank.

A store is a folder `<file stem>-<key>/` (the key: chatkit.data's fingerprint of the source bytes,
tokenizer, template and settings) holding one .npy file per column and `meta.json`:

    tokens.npy   int32  every sequence's token ids, one after another
    trained.npy  bool   per token: is it a training target
    offsets.npy  int64  sequence i is tokens[offsets[i]:offsets[i + 1]] (sequences + 1 entries)
    lengths.npy  int32  tokens per example (a preference pair's two sequences together): what packing reads
    meta.json           format, whether examples are pairs, and the per-outcome counts of tokenization

`open_store` maps the columns (np.load with mmap_mode="r") instead of reading them, so a rank's memory
does not grow with the data set: the pages a batch touches are read then, and every rank of a node
shares them through the page cache. `release` unmaps what a rank has read (Batches.stream calls it
after each batch), so its RSS does not fill up with mapped page-cache pages either.

`StoreWriter` takes the columns chunk by chunk (memory stays at one chunk whatever the file's size)
into a hidden temporary folder beside the entry, fsyncs it and renames it into place: a store is
whole or absent, never half-written. Two writers of one key (two nodes over one shared cache) both
finish; the first rename wins and the other copy, identical, is dropped.

The format before this one (one `<stem>-<key>.npz` per file, read whole into every rank) is not read:
such entries are ignored and their files tokenized again (their keys are also stale, as the key covers
this code). Delete old `*.npz` files in the cache folder to reclaim their space.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np
from loguru import logger

from chatkit.io import write_json

FORMAT = 1
COLUMNS = {"tokens": np.int32, "trained": np.bool_, "offsets": np.int64, "lengths": np.int32}


class Store(NamedTuple):
    """A store's columns (read-only memory maps) and meta.json's fields."""

    tokens: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    stats: dict[str, int]
    pairs: bool


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """The .npy header of a 1-D array of `n` items. NumPy pads the shape's room to the widest count
    it allows, so the header is as long for n = 0 as for any n: it can be written first as a
    placeholder and rewritten in place once the length is known."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


class _Column:
    """One .npy file written in chunks of unknown total length."""

    def __init__(self, path: Path, dtype: type):
        self.dtype = np.dtype(dtype)
        self.n = 0
        self.file = path.open("wb")
        self.file.write(_npy_header(self.dtype, 0))

    def append(self, values: np.ndarray) -> None:
        np.ascontiguousarray(values, dtype=self.dtype).tofile(self.file)
        self.n += len(values)

    def close(self) -> None:
        header = _npy_header(self.dtype, self.n)
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class StoreWriter:
    """Writes a store chunk by chunk; `finish` publishes it. As a context manager, a block left by an
    exception (a bad line, a kill) removes the temporary folder and publishes nothing."""

    def __init__(self, entry: str | Path, pairs: bool = False):
        self.entry = Path(entry)
        self.pairs = pairs
        self.entry.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.entry.name}.", suffix=".tmp", dir=self.entry.parent))
        self.columns = {name: _Column(self.tmp / f"{name}.npy", dtype) for name, dtype in COLUMNS.items()}
        self.columns["offsets"].append(np.zeros(1, np.int64))
        self.end = 0  # tokens written so far

    def add(self, tokens: np.ndarray, trained: np.ndarray, seq_lengths: np.ndarray) -> None:
        """Whole sequences (a pair's two always in one call): their tokens, targets and lengths."""
        seq_lengths = np.asarray(seq_lengths, np.int64)
        if len(tokens) != len(trained) or len(tokens) != int(seq_lengths.sum()):
            raise ValueError(
                f"{self.entry}: a chunk of {len(tokens)} tokens, {len(trained)} target flags and "
                f"sequence lengths summing to {int(seq_lengths.sum())}"
            )
        if self.pairs and len(seq_lengths) % 2:
            raise ValueError(f"{self.entry}: a chunk of preference pairs with an odd number of sequences")
        self.columns["tokens"].append(tokens)
        self.columns["trained"].append(trained)
        self.columns["offsets"].append(self.end + np.cumsum(seq_lengths))
        self.end += int(seq_lengths.sum())
        self.columns["lengths"].append(seq_lengths[0::2] + seq_lengths[1::2] if self.pairs else seq_lengths)

    def finish(self, stats: dict[str, int]) -> Path:
        """Close the columns, write meta.json and rename the folder into place; returns the entry."""
        for column in self.columns.values():
            column.close()
        write_json(self.tmp / "meta.json", {"format": FORMAT, "pairs": self.pairs, "stats": stats})
        _fsync_dir(self.tmp)
        try:
            os.rename(self.tmp, self.entry)
        except OSError:
            if not self.entry.is_dir():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # another process wrote this key first: same data
        _fsync_dir(self.entry.parent)
        return self.entry

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        if kind is not None:
            for column in self.columns.values():
                column.file.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(entry: str | Path) -> Store | None:
    """The store at `entry`, memory-mapped; None when there is none. A damaged one (a column cut
    short, columns that disagree: a full disk, a file edited by hand) is removed with a warning and
    None returned, so the file is tokenized again instead of failing every later run."""
    entry = Path(entry)
    if not entry.is_dir():
        return None
    try:
        return _open(entry)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning(
            f"{entry}: damaged tokenization cache entry ({type(e).__name__}: {e}); tokenizing again"
        )
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _open(entry: Path) -> Store:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
    cols = {}
    for name, dtype in COLUMNS.items():
        array = np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        if array.ndim != 1 or array.dtype != np.dtype(dtype):
            raise ValueError(f"{name}.npy: {array.dtype} of shape {array.shape}, not 1-D {np.dtype(dtype)}")
        cols[name] = array
    tokens, offsets, pairs = cols["tokens"], cols["offsets"], bool(meta["pairs"])
    sequences = len(offsets) - 1
    examples = sequences // 2 if pairs else sequences
    if (
        sequences < 0
        or int(offsets[0]) != 0
        or int(offsets[-1]) != len(tokens)
        or len(cols["trained"]) != len(tokens)
        or len(cols["lengths"]) != examples
        or (pairs and sequences % 2)
    ):
        raise ValueError("its columns disagree in length")
    stats = {str(k): int(v) for k, v in meta["stats"].items()}
    return Store(tokens, cols["trained"], offsets, cols["lengths"], stats, pairs)


def release(array: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped column that this process has read; they stay in the page
    cache, and reading them again maps them again (a minor fault, no disk read).

    Every page read through a mapping counts in the process's RSS, and with large page-cache folios
    (ext4 on Linux 6.x) one read maps up to 2 MB around it: without this, a rank's RSS reached the
    store's size within 300 batches of a 1 GB store, and whatever adds up RSS per job (Slurm's
    accounting, `ps`) would count the data set once per rank. Costs ~1 ms with 1 GB mapped."""
    mapping = getattr(array, "_mmap", None)  # set on the array np.load(mmap_mode=...) returns
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def source_digest(path: str | Path, cache: Path) -> str:
    """The blake2b digest of a file's bytes, remembered in `cache` beside the stores under the file's
    path, size, inode, modification and change times: every rank of every run needs the cache key, and
    re-reading tens of GB of text on every rank at every start would cost more than loading the data.
    Any write to the file changes its change time (ctime), so a remembered digest is never stale."""
    path = Path(path)
    st = path.stat()
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    name = hashlib.blake2b(str(path.resolve()).encode(), digest_size=12).hexdigest()
    memo = cache / ".sources" / f"{name}.json"
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if known["stamp"] == stamp:
            return str(known["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache: the digest is computed again next time
        write_json(memo, {"path": str(path.resolve()), "stamp": stamp, "digest": digest})
    return digest
