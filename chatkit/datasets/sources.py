"""Find, download and read upstream dataset files, row by row, each row with its location.

Formats (by file name): `.json` (a list of objects, a dict of equal-length columns, or JSON lines
under a .json name, as OpenAI's summarize-from-feedback batches are), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and
`.parquet`. A location is `file:line` for JSON lines and `file[index]` for the others, so every
error and skip can point at its row. Text is UTF-8 (a leading byte-order mark is allowed); a byte
that is not, invalid JSON or JSON nested deeper than Python can decode stops the run with the file
and the line (and column) where known.
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
        rows = _jsonl_rows(path, _open_binary(path))
    else:
        raise DatasetError(f"{path}: unknown format (expected one of {', '.join(SUFFIXES)})")
    yield from rows


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        # Files written with `zstd --long` need a window above the library's default limit.
        raw = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
            path.open("rb"), read_across_frames=True, closefd=True
        )
        return io.BufferedReader(raw)  # type: ignore[arg-type]  # a raw stream with readinto
    return path.open("rb")


def _not_utf8(e: UnicodeDecodeError, data: bytes, line: int | None = None) -> str:
    """Where a UTF-8 decoding error is: "line L, column C: not UTF-8 (byte 0xNN)" (column in bytes)."""
    start = data.rfind(b"\n", 0, e.start) + 1
    if line is None:
        line = data.count(b"\n", 0, e.start) + 1
    return f"line {line}, column {e.start - start + 1}: not UTF-8 (byte 0x{data[e.start]:02x}); re-encode it as UTF-8"


def _loads(text: str, where: str) -> Any:
    """json.loads, with nesting deeper than Python can decode reported as a DatasetError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DatasetError(
            f"{where}: JSON nested too deeply to read (over Python's recursion limit)"
        ) from None


def _jsonl_rows(path: Path, f: IO[bytes]) -> Iterator[tuple[str, Any]]:
    """JSON lines, decoded line by line so that a bad byte is reported on its own line."""
    with f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:  # a byte-order mark (Windows editors write one) is not part of the first row
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"{path}: {_not_utf8(e, raw, lineno)}") from None
                if not line.strip():
                    continue
                try:
                    row = _loads(line.rstrip("\r\n"), f"{path}:{lineno}")
                except json.JSONDecodeError as e:
                    problem = f"{e.msg.removesuffix(' at')} at column {e.colno}"
                    raise DatasetError(f"{path}:{lineno}: invalid JSON ({problem})") from None
                yield f"{path}:{lineno}", row
        except (OSError, EOFError) as e:
            raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        except Exception as e:
            if type(e).__name__ != "ZstdError":  # zstandard's error for a corrupt .zst frame
                raise
            raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: {_not_utf8(e, data)}") from None
    try:
        rows = _loads(text, str(path))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines under a .json name
            yield from _jsonl_rows(path, io.BytesIO(data))
            return
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(rows, dict) and rows and all(isinstance(v, list) for v in rows.values()):
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1:
            raise DatasetError(f"{path}: columns have different lengths ({sorted(lengths)})")
        rows = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    elif isinstance(rows, dict):  # JSON lines holding one row
        yield from _jsonl_rows(path, io.BytesIO(data))
        return
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a list of rows or a dict of columns, got {type(rows).__name__}")
    for i, row in enumerate(rows):
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
