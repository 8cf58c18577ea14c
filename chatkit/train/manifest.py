"""What a complete checkpoint holds: every file's size and sha256, written when the save is complete
and checked before a resume trusts it.

A checkpoint can be damaged after it was written (a truncated copy, a disk error, a file deleted by
hand); DeepSpeed would then fail inside its loader with an error naming neither the file nor the
checkpoint. Verifying first lets a resume say which file is wrong and fall back to an older checkpoint.
Files are hashed in threads (hashlib releases the GIL), so a checkpoint of many shards reads at disk
speed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chatkit.io import write_json

MANIFEST = "manifest.json"
_CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(folder: Path) -> None:
    """Record every file of `folder` (size, sha256) in `folder/manifest.json`, written last."""
    files = _files(folder)
    digests = _hash_all(files)
    entries = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(files, digests, strict=True)
    }
    write_json(folder / MANIFEST, {"files": entries})


def check_manifest(folder: Path) -> str | None:
    """None if `folder` holds exactly what its manifest recorded; else what is wrong, in one line.

    A folder without a manifest (saved before manifests existed) is accepted when it is not empty.
    """
    if not folder.is_dir():
        return f"{folder} does not exist"
    path = folder / MANIFEST
    if not path.is_file():
        return None if any(folder.iterdir()) else f"{folder} is empty"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({e})"
    wanted = []
    for name, entry in entries.items():
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{file} has {size:,} bytes, {entry['size']:,} when saved"
        wanted.append((file, entry["sha256"]))
    for (file, want), got in zip(wanted, _hash_all([f for f, _ in wanted]), strict=True):
        if got != want:
            return f"{file} differs from what was saved (sha256 {got[:12]}..., saved {want[:12]}...)"
    return None
