"""Re-shard a Hugging Face model folder's weights into safetensors files of at most --max-shard-size.

    python tools/make_shards.py --input outputs/openalpaca/hf --out outputs/openalpaca/hf-2GB --max-shard-size 2GB

Streams tensor by tensor (also from pytorch_model*.bin, read with weights_only), copies the config,
tokenizer and other files, and checks the output's weights checksum against the input's before
finishing. The input is never deleted unless --delete-input is given, and then only after that check;
--out equal to --input re-shards in place and so needs --delete-input too.
"""

import argparse
import shutil
import sys
from pathlib import Path

from chatkit.convert.weights import (
    DTYPES,
    WeightsError,
    copy_aux_files,
    hf_refs,
    weights_sha256,
    write_weights,
)
from chatkit.io import atomic_dir, check_apart


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB or 500MiB (default 2GB)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating weights (default: keep)")
    p.add_argument(
        "--delete-input", action="store_true", help="delete the input folder once the output checks"
    )
    args = p.parse_args()
    src, out = Path(args.input), Path(args.out)
    in_place = src.resolve() == out.resolve()
    if in_place and not args.delete_input:
        sys.exit("error: --out is --input: re-sharding in place replaces the input, so give --delete-input")
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if not in_place:  # in place (with --delete-input) is the one overlap asked for
            check_apart(out, {"--input": src})
        refs = hf_refs(src)
        with atomic_dir(out) as tmp:
            files = write_weights(tmp, refs, args.max_shard_size, dtype, progress=True)
            copy_aux_files(src, tmp, dtype)
            if dtype is None and weights_sha256(hf_refs(tmp)) != weights_sha256(refs):
                raise WeightsError(f"{out}: the written weights differ from {src}'s; nothing was replaced")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    shards = [f for f in files if f.suffix == ".safetensors"]
    print(f"wrote {len(shards)} shard(s) to {out}")
    if args.delete_input and not in_place:
        shutil.rmtree(src)
        print(f"deleted the input {src} (--delete-input)")


if __name__ == "__main__":
    main()
