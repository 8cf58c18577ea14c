"""Streamed weights I/O: safetensors read and written tensor by tensor, never a whole model in memory.

Converting a 7B-20B checkpoint must not need the model's size in RAM (Koala's diff recovery was killed
at 32 GB). Two rules make that hold:

- A `TensorRef` carries a tensor's name, shape and dtype without its data; `load()` reads the data when
  the writer needs it. Readers fill refs from file headers alone.
- The writer plans the output shards from refs, writes each shard's header first and then each tensor's
  bytes in turn, so at most one tensor (plus the one it was converted from) is resident.

Safetensors files are read with plain positioned reads, not mmap: mapped pages count as resident
memory for as long as the mapping lives, which would make a streamed pass look like a full load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from chatkit.convert.safe import torch_load_safe

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec)
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class WeightsError(ValueError):
    """A weights file or folder that cannot be read as asked; the message names the file."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor known by name, shape and dtype; `load()` reads its data (a fresh tensor each call)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        return self.numel * _itemsize(self.out_dtype(dtype))

    def out_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """Floating tensors take the requested dtype; integer and bool tensors keep theirs."""
        return dtype if dtype is not None and self.dtype.is_floating_point else self.dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


DEFAULT_MAX_SHARD_SIZE = "5GB"
"""The largest weights file every chatkit tool writes unless told otherwise (`--max-shard-size`)."""


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, 1000 -> 1000 (Hugging Face's `max_shard_size` units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m:
        raise ValueError(f"size {size!r}: expected a number with an optional unit, e.g. 2GB or 500MiB")
    value, unit = float(m.group(1)), m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(value * scale[unit])


# ---------------------------------------------------------------------------------------- reading


def read_header(path: str | Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20 or n > path.stat().st_size - 8:
            raise WeightsError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightsError(f"{path}: unreadable safetensors header ({e})") from None
    return 8 + n, header


def _pread_tensor(path: Path, start: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]):
    buf = bytearray(end - start)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(buf) != len(buf):
            raise WeightsError(f"{path}: truncated (tensor data ends past the end of the file)")
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def safetensors_refs(path: str | Path) -> list[TensorRef]:
    """Refs to every tensor of one safetensors file, in file order."""
    path = Path(path)
    base, header = read_header(path)
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in CODE_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, shape = CODE_DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = (base + o for o in info["data_offsets"])

        def load(start=start, end=end, dtype=dtype, shape=shape) -> torch.Tensor:
            return _pread_tensor(path, start, end, dtype, shape)

        refs.append(TensorRef(name, shape, dtype, load))
    return sorted(refs, key=lambda r: header[r.name]["data_offsets"][0])


class OneFileCache:
    """Keeps the last `torch.load`ed file only: streaming file after file never holds two at once."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.state: dict | None = None

    def get(self, path: Path, loader: Callable[[Path], dict]) -> dict:
        if self.path != path:
            self.state = None  # drop the old mapping before opening the next
            self.state, self.path = loader(path), path
        assert self.state is not None
        return self.state

    def clear(self) -> None:
        self.path, self.state = None, None


def torch_file_refs(path: str | Path, cache: OneFileCache | None = None) -> list[TensorRef]:
    """Refs to the tensors of a `pytorch_model*.bin` / `.pt` state dict (loaded lazily, one file held)."""
    path = Path(path)
    cache = cache or OneFileCache()
    state = cache.get(path, torch_load_safe)
    refs = []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")

        def load(name=name) -> torch.Tensor:
            return cache.get(path, torch_load_safe)[name].clone()

        refs.append(TensorRef(name, tuple(t.shape), t.dtype, load))
    return refs


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a Hugging Face folder, in shard order (safetensors preferred over .bin)."""
    folder = Path(folder)
    for index, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise WeightsError(f"{folder / index}: names shard(s) that are missing: {missing}")
            return [folder / f for f in files]
        if (folder / single).is_file():
            return [folder / single]
    raise WeightsError(f"{folder}: no model weights (model.safetensors[.index.json] or pytorch_model.bin)")


def hf_refs(folder: str | Path) -> list[TensorRef]:
    """Refs to every tensor of a Hugging Face model folder, shard after shard."""
    refs: list[TensorRef] = []
    cache = OneFileCache()
    for f in weight_files(folder):
        refs += safetensors_refs(f) if f.suffix == ".safetensors" else torch_file_refs(f, cache)
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise WeightsError(f"{folder}: tensors stored twice: {dup}")
    return refs


def largest_file(folder: str | Path) -> int:
    return max(f.stat().st_size for f in weight_files(folder))


# ---------------------------------------------------------------------------------------- writing


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them (no copy if contiguous)."""
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _header_bytes(refs: Sequence[TensorRef], dtype, metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for r in refs:
        n = r.nbytes(dtype)
        code = DTYPE_CODES[r.out_dtype(dtype)]
        header[r.name] = {"dtype": code, "shape": list(r.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the format asks


def write_safetensors(
    path: str | Path,
    refs: Sequence[TensorRef],
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Stream `refs` into one safetensors file (cast floating tensors to `dtype`); returns bytes written.

    The file is written in place: callers write into a temporary folder that they rename when done.
    """
    head = _header_bytes(refs, dtype, metadata)
    total = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for r in refs:
            t = r.load()
            if tuple(t.shape) != r.shape:
                raise WeightsError(f"{r.name}: loaded shape {tuple(t.shape)}, expected {r.shape}")
            t = t.to(r.out_dtype(dtype))
            data = tensor_bytes(t)
            f.write(data)
            total += len(data)
            if on_tensor:
                on_tensor(len(data))
            del t, data
        f.flush()
        os.fsync(f.fileno())
    return total


def plan_shards(refs: Sequence[TensorRef], max_bytes: int, dtype=None) -> list[list[TensorRef]]:
    """Group refs in order into shards of at most `max_bytes` (a bigger tensor gets a shard alone)."""
    shards: list[list[TensorRef]] = [[]]
    size = 0
    for r in refs:
        n = r.nbytes(dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(r)
        size += n
    return shards if shards[0] else []


def write_weights(
    out_dir: str | Path,
    refs: Sequence[TensorRef],
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    on_shard_done: Callable[[], None] | None = None,
) -> list[Path]:
    """Write refs as Hugging Face weights: `model.safetensors`, or shards plus the index when over the limit.

    `on_shard_done` lets a source drop what it cached for the shard just written.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise WeightsError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})[:5]}")
    shards = plan_shards(refs, parse_size(max_shard_size), dtype)
    total = sum(r.nbytes(dtype) for r in refs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress)
    files = []
    for i, shard in enumerate(shards):
        name = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        write_safetensors(out_dir / name, shard, dtype, on_tensor=bar.update)
        files.append(out_dir / name)
        if on_shard_done:
            on_shard_done()
    bar.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {r.name: f.name for f, shard in zip(files, shards, strict=True) for r in shard},
        }
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        files.append(out_dir / SAFETENSORS_INDEX)
    return files


def weights_sha256(refs: Iterable[TensorRef]) -> str:
    """A checksum of the weights themselves (names, dtypes, shapes, bytes in name order): equal for two
    folders holding the same tensors however they are sharded."""
    h = hashlib.sha256()
    for r in sorted(refs, key=lambda r: r.name):
        t = r.load()
        h.update(f"{r.name}|{DTYPE_CODES[t.dtype]}|{list(t.shape)}\n".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), for the memory checks and the benchmark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)$|.*\.index\.json$")


def copy_aux_files(
    src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, skip: Iterable[str] = ()
) -> list[str]:
    """Copy everything but the weights (config, tokenizer, generation config, chatkit.json, ...) from a
    model folder's top level; config.json's dtype follows a cast. Returns the names copied."""
    import shutil

    src, dst, skip = Path(src), Path(dst), set(skip)
    copied = []
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and not WEIGHT_FILE.fullmatch(f.name)
            and not f.name.startswith(".")
            and f.name not in skip
        ):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    if dtype is not None and (dst / "config.json").is_file():
        config = json.loads((dst / "config.json").read_text())
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copied
