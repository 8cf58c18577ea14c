"""Weight diffs (Koala style): publish `target - base` and let users recover `target` bit for bit.

A diff folder is a Hugging Face-style folder whose tensors are `target.float() - base.float()` in fp32,
plus the target's non-weight files (config, tokenizer, chat template...) so the recovered folder is
complete, plus:

- `diff_info.json`: format version, per tensor the target dtype, the sha256 of the base tensor (a wrong
  base is named tensor by tensor, before anything wrong is published) and of the target tensor, and
  the whole-target `weights_sha256` that the recovered folder must match.
- `diff_fixups.safetensors` (only when needed): fp32 arithmetic does not always give `t` back from
  `b + (t - b)` (rounding when `t` is far from `b`, signed zeros, NaN payloads). Make-diff runs the very
  recovery that `recover` will run, `(base.float() + diff).to(target_dtype)`, compares it bitwise with
  the target, and stores the elements that differ: `NAME:fixup_index` (flat int64 indices) and
  `NAME:fixup_value` (the exact target values, target dtype). The file is not a model weight file, so
  `hf_refs` and Hugging Face loaders never mistake it for one.

Tensors that are not floating point, or wider than fp32, are stored as they are (op "copy").

Everything is streamed with `TensorRef`s: each output tensor's `load()` reads one base and one
target/diff tensor and combines them, so memory stays at a few tensors whatever the model's size.
Inputs are only read; outputs are built with `atomic_dir` and appear only when complete and verified.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatkit.convert.weights import (
    BIN_INDEX,
    CODE_DTYPES,
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_CODES,
    SAFETENSORS_INDEX,
    TensorRef,
    WeightsError,
    copy_aux_files,
    hf_refs,
    safetensors_refs,
    tensor_bytes,
    weights_sha256,
    write_safetensors,
    write_weights,
)
from chatkit.io import atomic_dir, check_apart, write_json

DIFF_INFO = "diff_info.json"
FIXUPS_FILE = "diff_fixups.safetensors"
CHECKSUM_FILE = "checksum.sha256"
FORMAT = "chatkit-weight-diff"
FORMAT_VERSION = 1
FIXUP_INDEX, FIXUP_VALUE = ":fixup_index", ":fixup_value"
# Files that hold weights (or describe them) are never copied between folders: each folder gets its own.
NOT_COPIED = {SAFETENSORS_INDEX, BIN_INDEX, DIFF_INFO, CHECKSUM_FILE}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class DiffError(WeightsError):
    """A diff that cannot be made or applied as asked; the message names the tensor and the folder."""


class WrongBaseError(DiffError):
    """BASE holds different weights than the base the diff was made from."""


@dataclass
class DiffReport:
    """What a make-diff or recover run did: enough to print a summary and to test on."""

    out: Path
    tensors: int
    fixup_elements: int
    fixups_per_tensor: dict[str, int] = field(default_factory=dict)
    weights_sha256: str = ""
    fixups_bytes: int = 0
    """Size of the diff's fix-ups file (0: none): 8 bytes of index and the target's element size for
    each element fixed, so up to 3x the fixed share of an fp32 target's weights."""
    target_bytes: int = 0
    """Size of the target's weights (tensor data, as safetensors stores it)."""


# ---------------------------------------------------------------------------------------- helpers


def sha256_tensor(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (as safetensors stores them): a dtype change is a different hash."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def _is_diffed(target_dtype: torch.dtype, base_dtype: torch.dtype) -> bool:
    """Floating tensors up to fp32 are diffed in fp32; others (ints, bools, fp64) are stored as is."""
    small_float = target_dtype.is_floating_point and target_dtype.itemsize <= 4
    return small_float and base_dtype.is_floating_point


def _recover_tensor(base: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one recovery formula: make-diff checks it bitwise, recover runs it. Keep both on this."""
    return (base.float() + diff).to(dtype)


def _bitwise_mismatch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat indices where `a` and `b` differ bit for bit (so -0.0 vs 0.0 and NaN payloads count)."""
    as_int = _INT_OF_SIZE[a.dtype.itemsize]
    diff = a.reshape(-1).view(as_int) != b.reshape(-1).view(as_int)
    return diff.nonzero().reshape(-1)


def _check_folders(inputs: dict[str, Path], out: Path) -> None:
    """Inputs must be folders, and the output apart from them (the atomic rename would replace it)."""
    for role, p in inputs.items():
        if not p.is_dir():
            raise DiffError(f"{role} {p}: not a folder")
    check_apart(out, inputs, DiffError)


def _check_out_replaceable(out: Path, marker: str) -> None:
    """An existing --out is replaced only if empty or an earlier output of the same kind (has `marker`)."""
    if out.exists() and not out.is_dir():
        raise DiffError(f"--out {out} exists and is not a folder: refusing to replace it")
    if out.exists() and any(out.iterdir()) and not (out / marker).is_file():
        raise DiffError(f"--out {out} exists and has no {marker}: refusing to replace it; remove it first")


def _match_names(refs: dict[str, TensorRef], wanted: Sequence[str], role: str, folder: Path) -> None:
    """Both sides must hold the same tensors: name the first missing and the extra ones."""
    missing = [n for n in wanted if n not in refs]
    if missing:
        raise DiffError(f"tensor {missing[0]!r} missing in {role} {folder} ({len(missing)} missing in all)")
    extra = sorted(set(refs) - set(wanted))
    if extra:
        raise DiffError(
            f"{role} {folder} has tensors the other side lacks: {extra[:5]} ({len(extra)} in all)"
        )


# ---------------------------------------------------------------------------------------- make-diff


def _diff_ref(b: TensorRef, t: TensorRef, info: dict, spool: Path, fixups: dict[str, Path]) -> TensorRef:
    """The ref of one diff tensor; its load() hashes base and target and spools any fix-ups."""

    def load() -> torch.Tensor:
        base, target = b.load(), t.load()
        entry = info[t.name]
        entry["base_sha256"], entry["target_sha256"] = sha256_tensor(base), sha256_tensor(target)
        if entry["op"] == "copy":
            return target
        diff = target.float() - base.float()
        idx = _bitwise_mismatch(_recover_tensor(base, diff, target.dtype), target)
        entry["fixups"] = idx.numel()
        if idx.numel():
            path = spool / f"{len(fixups)}.safetensors"
            value = target.reshape(-1)[idx]
            write_safetensors(
                path, [_mem_ref(t.name + FIXUP_INDEX, idx), _mem_ref(t.name + FIXUP_VALUE, value)]
            )
            fixups[t.name] = path
        return diff

    dtype = torch.float32 if info[t.name]["op"] == "sub" else t.dtype
    return TensorRef(t.name, t.shape, dtype, load)


def _mem_ref(name: str, t: torch.Tensor) -> TensorRef:
    return TensorRef(name, tuple(t.shape), t.dtype, lambda: t)


def _plan_diff(base: Path, target: Path) -> tuple[list[TensorRef], dict[str, TensorRef], dict]:
    """Target refs, base refs by name, and the diff_info tensor entries, after checking names and shapes."""
    t_refs, b_refs = hf_refs(target), {r.name: r for r in hf_refs(base)}
    _match_names(b_refs, [r.name for r in t_refs], "BASE", base)
    tensors = {}
    for t in t_refs:
        b = b_refs[t.name]
        if b.shape != t.shape:
            raise DiffError(
                f"tensor {t.name!r}: shape {list(t.shape)} in TARGET {target}, {list(b.shape)} in BASE {base}"
            )
        tensors[t.name] = {
            "op": "sub" if _is_diffed(t.dtype, b.dtype) else "copy",
            "dtype": DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "base_dtype": DTYPE_CODES[b.dtype],
        }
    return t_refs, b_refs, tensors


def make_diff(
    base: str | Path,
    target: str | Path,
    out: str | Path,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
) -> DiffReport:
    """Write `out` = target - base (fp32) with fix-ups for exact recovery, diff_info.json and target files.

    Prints nothing (the returned report says what was written); `progress` shows a progress bar."""
    base, target, out = Path(base), Path(target), Path(out)
    _check_folders({"BASE": base, "TARGET": target}, out)
    _check_out_replaceable(out, DIFF_INFO)
    t_refs, b_refs, tensors = _plan_diff(base, target)
    with atomic_dir(out) as tmp:
        spool, fixups = tmp / ".fixups-spool", {}
        spool.mkdir()
        refs = [_diff_ref(b_refs[t.name], t, tensors, spool, fixups) for t in t_refs]
        write_weights(tmp, refs, max_shard_size, progress=progress)
        unread = [n for n, e in tensors.items() if "target_sha256" not in e]
        if unread:  # write_weights is expected to load every ref exactly once
            raise DiffError(f"internal error: tensors never read while writing the diff: {unread[:5]}")
        if fixups:
            _gather_fixups(tmp / FIXUPS_FILE, fixups)
        shutil.rmtree(spool)
        target_sum = weights_sha256(t_refs)
        copy_aux_files(target, tmp, skip=NOT_COPIED)
        counts = {n: e.get("fixups", 0) for n, e in tensors.items()}
        info = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "diff_dtype": DTYPE_CODES[torch.float32],
            "recovery": "(base.float() + diff).to(dtype), then fix-ups; op 'copy' tensors are stored as is",
            "fixups_file": FIXUPS_FILE if fixups else None,
            "fixup_elements": sum(counts.values()),
            "target_sha256": target_sum,
            "tensors": tensors,
        }
        write_json(tmp / DIFF_INFO, info)
    sizes = _sizes(out, info, t_refs)
    return DiffReport(out, len(refs), info["fixup_elements"], counts, target_sum, *sizes)


def _sizes(diff: Path, info: dict, target_refs: Sequence[TensorRef]) -> tuple[int, int]:
    """(bytes of the diff's fix-ups file, bytes of the target's weights)."""
    fixups = diff / info["fixups_file"] if info.get("fixups_file") else None
    return (fixups.stat().st_size if fixups else 0), sum(r.nbytes() for r in target_refs)


def _gather_fixups(path: Path, spooled: dict[str, Path]) -> None:
    """Stream the per-tensor spool files into the one fix-ups file (one tensor in memory at a time)."""
    refs = [r for f in spooled.values() for r in safetensors_refs(f)]
    write_safetensors(path, refs, metadata={"chatkit": FORMAT})


# ---------------------------------------------------------------------------------------- recover


def read_diff_info(diff: str | Path) -> dict:
    """diff_info.json of a diff folder, checked for format and version."""
    path = Path(diff) / DIFF_INFO
    if not path.is_file():
        raise DiffError(
            f"{diff}: no {DIFF_INFO}; not a diff folder made by tools/diff_checkpoint.py --make-diff"
        )
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise DiffError(f"{path}: unreadable ({e})") from None
    if info.get("format") != FORMAT or not isinstance(info.get("version"), int):
        raise DiffError(f"{path}: not a {FORMAT} file")
    if info["version"] > FORMAT_VERSION:
        raise DiffError(
            f"{path}: format version {info['version']} is newer than this tool reads ({FORMAT_VERSION})"
        )
    return info


def _fixup_refs(diff: Path, info: dict) -> dict[str, TensorRef]:
    """Fix-up refs by name; checks every tensor's count against diff_info up front."""
    refs = {}
    if info.get("fixups_file"):
        path = diff / info["fixups_file"]
        if not path.is_file():
            raise DiffError(
                f"{path}: missing; {DIFF_INFO} says {info['fixup_elements']} element(s) need fix-ups"
            )
        refs = {r.name: r for r in safetensors_refs(path)}
    for name, entry in info["tensors"].items():
        n = entry.get("fixups", 0)
        if not n:
            continue
        idx, val = refs.get(name + FIXUP_INDEX), refs.get(name + FIXUP_VALUE)
        if idx is None or val is None or idx.shape != (n,) or val.shape != (n,):
            raise DiffError(f"tensor {name!r}: fix-ups missing or damaged in {diff / FIXUPS_FILE}")
    return refs


def _check_diff_refs(diff: Path, info: dict, d_refs: dict[str, TensorRef]) -> None:
    """The diff's weights must be exactly what diff_info describes (catches a damaged or mixed folder)."""
    _match_names(d_refs, list(info["tensors"]), "DIFF", diff)
    for name, e in info["tensors"].items():
        want = torch.float32 if e["op"] == "sub" else CODE_DTYPES[e["dtype"]]
        d = d_refs[name]
        if d.shape != tuple(e["shape"]) or d.dtype != want:
            raise DiffError(
                f"tensor {name!r} in DIFF {diff}: {d.dtype} {list(d.shape)} disagrees with {DIFF_INFO}"
            )


def _check_base_refs(base: Path, info: dict, b_refs: dict[str, TensorRef]) -> None:
    """Names, shapes and dtypes of BASE against diff_info, from the headers, before any data is read."""
    _match_names(b_refs, list(info["tensors"]), "BASE", base)
    for name, e in info["tensors"].items():
        b = b_refs[name]
        if b.shape != tuple(e["shape"]):
            raise DiffError(
                f"tensor {name!r}: shape {list(b.shape)} in BASE {base}, {e['shape']} in the diff"
            )
        if DTYPE_CODES[b.dtype] != e["base_dtype"]:
            raise WrongBaseError(
                f"BASE {base} is not the model this diff was made from: tensor {name!r} is "
                f"{DTYPE_CODES[b.dtype]}, the diff was made from {e['base_dtype']}"
            )


def _recovered_ref(
    b: TensorRef, d: TensorRef, entry: dict, fix: dict[str, TensorRef], base: Path
) -> TensorRef:
    """The ref of one recovered tensor: checks the base tensor's hash, adds the diff, applies fix-ups,
    and checks the result's hash, so a problem is named by tensor before the output is published."""
    dtype = CODE_DTYPES[entry["dtype"]]

    def load() -> torch.Tensor:
        t = b.load()
        if sha256_tensor(t) != entry["base_sha256"]:
            raise WrongBaseError(
                f"BASE {base} is not the model this diff was made from: tensor {b.name!r} differs"
            )
        if entry["op"] == "sub":
            t = _recover_tensor(t, d.load(), dtype)
            if entry.get("fixups"):
                idx, val = fix[b.name + FIXUP_INDEX].load(), fix[b.name + FIXUP_VALUE].load()
                if idx.numel() and (idx.min() < 0 or idx.max() >= t.numel()):
                    raise DiffError(f"tensor {b.name!r}: fix-up index out of range (diff folder damaged)")
                t.view(-1)[idx] = val.to(dtype)
        else:
            t = d.load()
        if sha256_tensor(t) != entry["target_sha256"]:
            raise DiffError(
                f"tensor {b.name!r}: recovered bytes differ from the target (diff folder damaged?)"
            )
        return t

    return TensorRef(b.name, b.shape, dtype, load)


def recover(
    base: str | Path,
    diff: str | Path,
    out: str | Path,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
) -> DiffReport:
    """Write `out` = base + diff, bit-exact, with checksum.sha256; published only if it matches the target.

    Prints nothing (the returned report says what was written); `progress` shows a progress bar."""
    base, diff, out = Path(base), Path(diff), Path(out)
    _check_folders({"BASE": base, "DIFF": diff}, out)
    info = read_diff_info(diff)
    _check_out_replaceable(out, CHECKSUM_FILE)
    d_refs, b_refs = {r.name: r for r in hf_refs(diff)}, {r.name: r for r in hf_refs(base)}
    _check_diff_refs(diff, info, d_refs)
    _check_base_refs(base, info, b_refs)
    fix = _fixup_refs(diff, info)
    order = list(d_refs)  # the diff keeps the target's tensor order; so does the recovered folder
    refs = [_recovered_ref(b_refs[n], d_refs[n], info["tensors"][n], fix, base) for n in order]
    with atomic_dir(out) as tmp:
        write_weights(tmp, refs, max_shard_size, progress=progress)
        copy_aux_files(diff, tmp, skip=NOT_COPIED)
        digest = weights_sha256(hf_refs(tmp))  # read back from disk: checks what users will load
        (tmp / CHECKSUM_FILE).write_text(format_checksum(digest))
        if digest != info["target_sha256"]:
            raise DiffError(
                f"recovered weights checksum {digest} != target checksum {info['target_sha256']} "
                f"from {diff / DIFF_INFO}; nothing written to {out}"
            )
    counts = {n: e.get("fixups", 0) for n, e in info["tensors"].items()}
    return DiffReport(out, len(refs), info["fixup_elements"], counts, digest, *_sizes(diff, info, refs))


# ---------------------------------------------------------------------------------------- verify


def format_checksum(digest: str) -> str:
    """sha256sum-like line: the hash, two spaces, what it covers (weights_sha256 covers all weights)."""
    return f"{digest}  weights_sha256\n"


def read_checksum(path: Path) -> str:
    """The hash of a checksum.sha256 file (first word of its first line)."""
    if not path.is_file():
        raise DiffError(f"{path}: no checksum file (give --diff DIFF_DIR to compare with a diff's target)")
    words = path.read_text().split()
    if not words or len(words[0]) != 64:
        raise DiffError(f"{path}: not a checksum file (expected '<sha256>  weights_sha256')")
    return words[0].lower()


def verify(folder: str | Path, diff: str | Path | None = None) -> str:
    """Recompute a folder's weights_sha256 and compare it with the diff's target checksum (if `diff`)
    or with the folder's own checksum.sha256; returns the digest, raises DiffError on a mismatch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffError(f"{folder}: not a folder")
    if diff is not None:
        expected, source = read_diff_info(diff)["target_sha256"], Path(diff) / DIFF_INFO
    else:
        expected, source = read_checksum(folder / CHECKSUM_FILE), folder / CHECKSUM_FILE
    digest = weights_sha256(hf_refs(folder))
    if digest != expected:
        raise DiffError(f"{folder}: weights checksum {digest} does not match {expected} from {source}")
    return digest
