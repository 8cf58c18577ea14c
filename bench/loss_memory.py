"""Memory of the supervised loss: full logits (chatkit.train.loss) against chunks (chatkit.train.chunked).

    python bench/loss_memory.py            # 2 rows of 4,096 tokens, hidden 512 (~2 minutes on 2 cores)
    python bench/loss_memory.py --quick    # 1 row, hidden 256 (under a minute)

Inputs: rows of 4,096 tokens, the GPT-NeoX-20B tokenizer's 50,277-token vocabulary, random fp32 hidden
states (B, T, C) and head weight (V, C), every position trained (the chunked loss's worst case: masked
prompt tokens would skip its head matmuls too). One loss + backward per run, with gradients w.r.t.
hidden and weight:

- full: `token_loss_sum(F.linear(hidden, weight), labels)`, the (B, T, V) logits as today;
- chunked: `chunked_token_loss_sum(hidden, weight, labels)`, CHUNK_TOKENS positions at a time.

Each run is a fresh Python process. Its extra memory is the peak resident set at the end
(`resource.getrusage(...).ru_maxrss`) minus the resident set read just after the inputs were allocated
(and BLAS warmed up on a small matmul): what the loss and its backward add, the gradients included.
The runs save their gradients, which are compared here (largest difference relative to each
gradient's largest element, at most 1e-5). Final line: JSON, with `loss_memory_over_full_logits`
(target at most 0.25) and `gradients_equal`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50_277
KINDS = ("full", "chunked")


def rss_now() -> int:
    """Current resident set in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(kind: str, rows: int, seq: int, vocab: int, hidden: int, out: Path) -> dict:
    """One loss + backward in this (fresh) process: extra peak bytes, seconds, loss; saves the gradients."""
    import resource
    import time

    import torch
    import torch.nn.functional as F

    from chatkit.train.chunked import chunked_token_loss_sum
    from chatkit.train.loss import token_loss_sum

    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, seq, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    torch.randn(256, 256) @ torch.randn(256, 256)  # BLAS's own buffers belong to the baseline
    base = rss_now()
    t0 = time.perf_counter()
    loss = token_loss_sum(F.linear(h, w), labels) if kind == "full" else chunked_token_loss_sum(h, w, labels)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save({"hidden": h.grad, "weight": w.grad}, out)
    return {"extra_peak_bytes": peak - base, "seconds": seconds, "loss": float(loss)}


def run(kind: str, args: argparse.Namespace, out: Path) -> dict:
    spec = {"kind": kind, "rows": args.rows, "seq": args.seq, "vocab": args.vocab, "hidden": args.hidden}
    cmd = [sys.executable, __file__, "--worker", json.dumps({**spec, "out": str(out)})]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{kind}: +{r['extra_peak_bytes'] / 2**20:,.0f} MiB, {r['seconds']:.1f} s", file=sys.stderr)
    return r


def compare(paths: dict[str, Path]) -> float:
    """Largest difference of the chunked gradients from the full ones, relative to each one's largest."""
    import torch

    full, chunked = (torch.load(paths[k]) for k in KINDS)
    return max(float((chunked[k] - full[k]).abs().max() / full[k].abs().max()) for k in full)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 row, hidden 256 (default 2 rows, hidden 512)")
    p.add_argument("--rows", type=int, help="rows per micro-batch (overrides --quick)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per row")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--hidden", type=int, help="hidden size (overrides --quick)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        w = json.loads(args.worker)
        print(json.dumps(worker(w["kind"], w["rows"], w["seq"], w["vocab"], w["hidden"], Path(w["out"]))))
        return
    args.rows = args.rows or (1 if args.quick else 2)
    args.hidden = args.hidden or (256 if args.quick else 512)
    from chatkit.train.chunked import CHUNK_TOKENS

    with tempfile.TemporaryDirectory() as d:
        paths = {k: Path(d) / f"{k}.pt" for k in KINDS}
        res = {k: run(k, args, paths[k]) for k in KINDS}
        diff = compare(paths)
    full, chunked = res["full"], res["chunked"]
    mib = 2**20
    print(
        json.dumps(
            {
                "bench": "loss_memory",
                "rows": args.rows, "seq": args.seq, "vocab": args.vocab, "hidden": args.hidden,
                "chunk_tokens": CHUNK_TOKENS,
                "fp32_logits_mib": round(args.rows * args.seq * args.vocab * 4 / mib, 1),
                "full_extra_peak_mib": round(full["extra_peak_bytes"] / mib, 1),
                "chunked_extra_peak_mib": round(chunked["extra_peak_bytes"] / mib, 1),
                "loss_memory_over_full_logits": round(chunked["extra_peak_bytes"] / full["extra_peak_bytes"], 4),
                "target_0_25_met": chunked["extra_peak_bytes"] <= 0.25 * full["extra_peak_bytes"],
                "full_seconds": round(full["seconds"], 2),
                "chunked_seconds": round(chunked["seconds"], 2),
                "loss_rel_diff": abs(chunked["loss"] - full["loss"]) / abs(full["loss"]),
                "max_grad_rel_diff": diff,
                "gradients_equal": diff <= 1e-5,
            }
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
