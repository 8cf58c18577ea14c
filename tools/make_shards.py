"""Re-shard a Hugging Face model folder's weights into safetensors files of at most --max-shard-size.

    python tools/make_shards.py --input outputs/openalpaca/hf --out outputs/openalpaca/hf-2GB --max-shard-size 2GB

Streams tensor by tensor (also from pytorch_model*.bin, read with weights_only), copies the config,
tokenizer and other files, and checks the output's weights checksum against the input's before
finishing. The input is never deleted unless --delete-input is given, and then only after that check;
--out equal to --input re-shards in place and so needs --delete-input too. An existing --out is
replaced only when it is empty or an earlier make_shards output (it holds .make_shards.json), or with
--overwrite.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from chatkit.convert.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPES,
    WeightsError,
    copy_aux_files,
    hf_refs,
    weights_sha256,
    write_weights,
)
from chatkit.io import atomic_dir, check_apart

MARKER = ".make_shards.json"
"""Written into every output: what was re-sharded from what. Hidden, so copy_aux_files never carries it
into another tool's output."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest shard, e.g. 2GB or 500MiB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating weights (default: keep)")
    p.add_argument(
        "--delete-input", action="store_true", help="delete the input folder once the output checks"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not an earlier make_shards output (default: refuse)",
    )
    return p


def _check_out(out: Path, overwrite: bool) -> None:
    """An existing --out is replaced only if empty, an earlier make_shards output, or with --overwrite."""
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} exists and is not a folder: refusing to replace it")
    if overwrite or not out.exists() or (out / MARKER).is_file() or not any(out.iterdir()):
        return
    sys.exit(
        f"error: --out {out} is not empty and not an earlier make_shards output: refusing to replace it; "
        "give --overwrite to replace it, or choose another folder"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    src, out = Path(args.input), Path(args.out)
    if not src.is_dir():
        sys.exit(f"error: --input {src}: {'not a folder' if src.exists() else 'no such folder'}")
    in_place = src.resolve() == out.resolve()
    if in_place and not args.delete_input:
        sys.exit("error: --out is --input: re-sharding in place replaces the input, so give --delete-input")
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if not in_place:  # in place (with --delete-input) is the one replacement of an input asked for
            check_apart(out, {"--input": src})
            _check_out(out, args.overwrite)
        refs = hf_refs(src)
        with atomic_dir(out) as tmp:
            files = write_weights(tmp, refs, args.max_shard_size, dtype, progress=True)
            copy_aux_files(src, tmp, dtype)
            if dtype is None and weights_sha256(hf_refs(tmp)) != weights_sha256(refs):
                raise WeightsError(f"{out}: the written weights differ from {src}'s; nothing was replaced")
            marker = {"input": str(src.resolve()), "max_shard_size": args.max_shard_size, "dtype": args.dtype}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    shards = [f for f in files if f.suffix == ".safetensors"]
    print(f"wrote {len(shards)} shard(s) to {out}")
    if args.delete_input and not in_place:
        shutil.rmtree(src)
        print(f"deleted the input {src} (--delete-input)")


if __name__ == "__main__":
    main()
