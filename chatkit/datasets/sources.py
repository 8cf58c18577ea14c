"""Find, download and read upstream dataset files, row by row, each row with its location.

Formats (by file name): `.json` (a list of objects, a dict of equal-length columns, or JSON lines
under a .json name, as OpenAI's summarize-from-feedback batches are), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and
`.parquet`. A location is `file:line` for JSON lines and `file[index]` for the others, so every
error and skip can point at its row.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any

from chatkit.datasets.spec import DatasetSpec

SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


class DatasetError(RuntimeError):
    """Bad input or an unusable source: the message says which file, row and field, and what to do."""


def download(spec: DatasetSpec, patterns: tuple[str, ...]) -> Path:
    """Fetch the files matching `patterns` from the hub (or the local cache); returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            spec.repo, repo_type="dataset", revision=spec.revision, allow_patterns=list(patterns)
        )
    except OSError as e:  # offline, unreachable, unknown repository or revision: HfHubHTTPError is one too
        raise DatasetError(
            f"could not download {spec.repo} from the Hugging Face hub ({type(e).__name__}: {e}); "
            f"download it yourself and pass --source PATH (a file or a folder holding {', '.join(patterns)})"
        ) from None
    return Path(folder)


def find_files(source: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The file itself, or the files under a folder whose relative path matches a pattern, sorted."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DatasetError(f"--source {source}: no such file or folder")
    found = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and any(fnmatchcase(p.relative_to(source).as_posix(), pat) for pat in patterns)
    )
    if not found:
        raise DatasetError(f"{source}: no files matching {', '.join(patterns)} (choose others with --files)")
    return found


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) for every row of an upstream file; stop at the first malformed one.

    Rows are usually JSON objects; the mapping checks (OpenAI's raw WebGPT rows are pairs, lists).
    """
    name = path.name
    if name.endswith(".parquet"):
        rows: Iterator[tuple[str, Any]] = _parquet_rows(path)
    elif name.endswith(".json"):
        rows = _json_rows(path)
    elif name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        rows = _jsonl_rows(path, _open_text(path))
    else:
        raise DatasetError(f"{path}: unknown format (expected one of {', '.join(SUFFIXES)})")
    yield from rows


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        # Files written with `zstd --long` need a window above the library's default limit.
        raw = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
            path.open("rb"), read_across_frames=True, closefd=True
        )
        return io.TextIOWrapper(raw, encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl_rows(path: Path, f: IO[str]) -> Iterator[tuple[str, Any]]:
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    problem = f"{e.msg.removesuffix(' at')} at column {e.colno}"
                    raise DatasetError(f"{path}:{lineno}: invalid JSON ({problem})") from None
                yield f"{path}:{lineno}", row
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines under a .json name
            yield from _jsonl_rows(path, io.StringIO(text))
            return
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DatasetError(f"{path}: columns have different lengths ({sorted(lengths)})")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    elif isinstance(data, dict):  # JSON lines holding one row
        yield from _jsonl_rows(path, io.StringIO(text))
        return
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of rows or a dict of columns, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for files that are not parquet
        raise DatasetError(f"{path}: cannot read as parquet ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}[{i}]", row
            i += 1
