"""Find, download and read upstream dataset files, row by row, each row with its location.

Formats (by file name): `.json` (a list of objects, a dict of equal-length columns, or JSON lines
under a .json name, as OpenAI's summarize-from-feedback batches are), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` and
`.parquet`. A location is `file:line` for JSON lines and `file[index]` for the others, so every
error and skip can point at its row. Text is UTF-8 (a leading byte-order mark is allowed); a byte
that is not, invalid JSON or JSON nested deeper than Python can decode stops the run with the file
and the line (and column) where known.

A --source folder is searched with the spec's globs; when they match nothing there, with the same
names in the other formats read here (`*.parquet` -> `*.json`, `*.jsonl`, ...), then with the
upstream's other published names (`DatasetSpec.other_files`), each file once; when still nothing
matches, the error says what was looked for and what the folder holds.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any

from chatkit.datasets.spec import DatasetSpec

SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_LONGEST_FIRST = sorted(SUFFIXES, key=len, reverse=True)

logger = logging.getLogger(__name__)


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


def _split_suffix(name: str) -> tuple[str, str] | None:
    """(stem, suffix) for a name or glob ending in a readable format's suffix, else None."""
    for suffix in _LONGEST_FIRST:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def other_formats(patterns: Sequence[str]) -> tuple[str, ...]:
    """The same names in every other readable format: `*.parquet` -> `*.json`, `*.jsonl`, ..."""
    out = []
    for pattern in patterns:
        split = _split_suffix(pattern)
        if split is not None:
            out += [split[0] + suffix for suffix in SUFFIXES if suffix != split[1]]
    return tuple(dict.fromkeys(out))


def fallback_stages(patterns: Sequence[str], other_names: Sequence[str] = ()) -> list[tuple[str, ...]]:
    """What a --source folder is searched with when `patterns` match nothing there, stage after stage
    (the first that matches is read, so one release is never read beside another): the same names in
    the other readable formats, then the upstream's other names in every readable format."""
    stages = [other_formats(patterns)]
    if other_names:
        stages.append(tuple(dict.fromkeys((*other_names, *other_formats(other_names)))))
    return stages


def _few(names: Sequence[str], n: int = 5) -> str:
    """'a, b, c' or 'a, b, c and 4 more'."""
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _matching(files: list[str], patterns: Sequence[str]) -> list[str]:
    return [f for f in files if any(fnmatchcase(f, pat) for pat in patterns)]


def _once_per_file(files: list[str]) -> list[str]:
    """One of the files that differ only by format (x.jsonl, x.jsonl.gz...): the first in SUFFIXES order."""
    best: dict[str, tuple[int, str]] = {}
    for f in files:
        stem, suffix = _split_suffix(f) or (f, "")
        rank = SUFFIXES.index(suffix) if suffix else len(SUFFIXES)
        if stem not in best or rank < best[stem][0]:
            best[stem] = (rank, f)
    return sorted(f for _, f in best.values())


def find_files(
    source: Path, patterns: Sequence[str], fallback: bool = False, other_names: Sequence[str] = ()
) -> list[Path]:
    """The file itself, or the files under a folder whose relative path matches a pattern, sorted.

    With `fallback`, when no pattern matches: the folder's files matching the first of
    `fallback_stages(patterns, other_names)` that matches any, one format per file and hidden ones
    left out, with a log line naming them. When nothing matches, a DatasetError says what was looked
    for and what the folder holds.
    """
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DatasetError(f"--source {source}: no such file or folder")
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    found = _matching(files, patterns)
    if found:
        return [source / f for f in found]
    visible = [f for f in files if not any(part.startswith(".") for part in f.split("/"))]
    for stage in fallback_stages(patterns, other_names) if fallback else []:
        found = _once_per_file(_matching(visible, stage))
        if found:
            logger.info(
                "%s: no files matching %s; reading the upstream's files found under other names or formats: %s",
                source, ", ".join(patterns), _few(found),
            )  # fmt: skip
            return [source / f for f in found]
    looked = f"no files matching {', '.join(patterns)}"
    if other_names:
        looked += f", nor the upstream's other files {', '.join(other_names)}"
    if fallback:
        looked += f", in any format read here ({', '.join(SUFFIXES)})"
    holds = f"the folder holds {_few(visible)}" if visible else "the folder is empty"
    raise DatasetError(f"{source}: {looked}; {holds}; name the files to read with --files GLOB [GLOB ...]")


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
