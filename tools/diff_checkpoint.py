"""Publish a fine-tuned model as a weight diff against its base (Koala style), and recover it bit-exactly.

    # maker: DIFF = TARGET - BASE (fp32), plus the target's config/tokenizer files and diff_info.json
    python tools/diff_checkpoint.py --make-diff --base llama-7b --target koala-7b --out koala-7b-diff

    # user: TARGET = BASE + DIFF, streamed tensor by tensor, checked against the target's checksum
    python tools/diff_checkpoint.py --recover --base llama-7b --diff koala-7b-diff --out koala-7b

    # check a recovered folder later (against its checksum.sha256, or against the diff's record)
    python tools/diff_checkpoint.py --verify koala-7b [--diff koala-7b-diff]

Recovery is bit-exact: elements where fp32 rounding would not give the target back are stored as
fix-ups (diff_fixups.safetensors; for an fp32 target up to 3x the share of elements fixed, of the
model's size: --make-diff prints it). A wrong BASE is named tensor by tensor before anything is written.
Outputs are built in a temporary folder and renamed into place only when complete and verified;
inputs are only read. Memory stays at a few tensors whatever the model's size.
"""

from __future__ import annotations

import argparse
import sys

from chatkit.convert.weight_diff import FIXUPS_FILE, DiffReport, make_diff, recover, verify
from chatkit.convert.weights import DEFAULT_MAX_SHARD_SIZE, WeightsError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-diff", action="store_true", help="write OUT = TARGET - BASE")
    mode.add_argument("--recover", action="store_true", help="write OUT = BASE + DIFF")
    mode.add_argument("--verify", metavar="DIR", help="check DIR's weights against its checksum (or --diff)")
    p.add_argument("--base", help="the base model folder (e.g. LLaMA)")
    p.add_argument("--target", help="--make-diff: the fine-tuned model folder")
    p.add_argument("--diff", help="--recover / --verify: the diff folder")
    p.add_argument("--out", help="output folder (must not overlap an input; replaced atomically when done)")
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest weights file written (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _need(p: argparse.ArgumentParser, args: argparse.Namespace, mode: str, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        p.error(f"{mode} needs {', '.join(missing)}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _made(r: DiffReport) -> str:
    """The one line --make-diff prints: what was written and, if any, how big the fix-ups are."""
    line = f"diff written to {r.out}: {r.tensors} tensors, {r.fixup_elements} element(s) needed fix-ups"
    if r.fixups_bytes:
        share = r.fixups_bytes / r.target_bytes if r.target_bytes else 0
        line += f" ({FIXUPS_FILE}: {_size(r.fixups_bytes)}, {share:.0%} of the target's weights)"
    return line


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    progress = not args.no_progress
    try:
        if args.make_diff:
            _need(p, args, "--make-diff", "base", "target", "out")
            r = make_diff(args.base, args.target, args.out, args.max_shard_size, progress)
            print(_made(r))
        elif args.recover:
            _need(p, args, "--recover", "base", "diff", "out")
            r = recover(args.base, args.diff, args.out, args.max_shard_size, progress)
            print(f"recovered {r.out}: {r.tensors} tensors, bit-exact (weights sha256 {r.weights_sha256})")
        else:
            digest = verify(args.verify, args.diff)
            print(f"OK: {args.verify} weights sha256 {digest} matches")
    except (WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
