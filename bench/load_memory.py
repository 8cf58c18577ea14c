"""A training rank's memory when the data outgrows RAM: the token store and the epoch's row plan.

    python bench/load_memory.py            # a 1 GB token store; a row plan of 10M sequences
    python bench/load_memory.py --quick    # a 256 MB store; a row plan of 2M sequences

Each figure comes from a fresh Python process that imports chatkit.data (and so torch) before its
baseline is read from /proc/self/status:

- token_store_rank_growth_mb: a rank's RSS growth (VmRSS) after mapping a token store the bench wrote
  (chatkit.token_store) and building `--batches` micro-batches from it through Batches.stream (packed
  rows of 2,048 tokens, 8 a micro-batch, rank 0 of 8). Target: <= 100 MB. RSS counts the store's pages
  a rank has read while they stay mapped (whole large folios, up to 2 MB a read, on ext4); the stream
  unmaps them after each batch (chatkit.token_store.release): token_store_rss_unreleased_mb is the
  growth without that. Beside them, the private part (RssAnon), and full_read_growth_mb: the same
  columns read whole (np.load without mmap_mode), what the .npz cache cost every rank before.
- row_plan: Batches.rows(0) over synthetic sequence lengths (log-normal, 8-2,048 tokens, packed into
  rows of 2,048): seconds, peak growth while planning (VmHWM after a reset through clear_refs) and what
  the plan keeps. The per-item Python loop this replaced took 71 s and 2.07 GB at 10M sequences on the
  2-core development machine (and, as Batches.rows called it, hours: the lengths were recomputed for
  every item).

Final line: JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEMORY = """
import json, sys, time
from pathlib import Path
import numpy as np
from chatkit.data import Batches, TokenizedSet
from chatkit.token_store import open_store

def memory():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "VmHWM")}
"""
STREAM = (
    MEMORY
    + """
before = memory()
s = open_store(sys.argv[1])
ts = TokenizedSet(s.tokens, s.trained, s.offsets, s.stats, example_lengths=s.lengths)
if sys.argv[3] == "keep":  # the stream without unmapping what it read
    ts.release = lambda: None
stream = Batches([ts], None, 8, 2048, True, 0, 8, 0, 0).stream()
t0 = time.perf_counter()
tokens = sum(int((next(stream)[1]["segment_ids"] >= 0).sum()) for _ in range(int(sys.argv[2])))
after = memory()
print(json.dumps({"anon": after["RssAnon"] - before["RssAnon"], "rss": after["VmRSS"] - before["VmRSS"],
                  "seconds": time.perf_counter() - t0, "tokens": tokens}))
"""
)
FULL_READ = (
    MEMORY
    + """
before = memory()
columns = [np.load(Path(sys.argv[1]) / f"{name}.npy") for name in ("tokens", "trained", "offsets", "lengths")]
print(json.dumps({"anon": memory()["RssAnon"] - before["RssAnon"]}))
"""
)
PLAN = (
    MEMORY
    + """
n = int(sys.argv[1])
lengths = np.clip(np.random.default_rng(0).lognormal(5.5, 0.8, n), 8, 2048).astype(np.int32)
offsets = np.zeros(n + 1, np.int64)
np.cumsum(lengths, out=offsets[1:])
ts = TokenizedSet(np.zeros(1, np.int32), np.zeros(1, bool), offsets, example_lengths=lengths)
batches = Batches([ts], None, 8, 2048, True, 0, 8, 0, 0)
Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
before = memory()
t0 = time.perf_counter()
plan = batches.rows(0)
seconds = time.perf_counter() - t0
t0 = time.perf_counter()
batches.rows(0)
again = time.perf_counter() - t0
kept = (plan.files.nbytes + plan.items.nbytes + plan.starts.nbytes) / 2**20
print(json.dumps({"seconds": seconds, "again_s": again, "peak": memory()["VmHWM"] - before["VmRSS"],
                  "kept": kept, "rows": len(plan)}))
"""
)


def probe(script: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"probe failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_store(entry: Path, mb: int) -> tuple[float, int]:
    """A store of about `mb` MB (5 bytes a token) of sequences of 50-1,000 tokens; (MB, sequences)."""
    from chatkit.token_store import StoreWriter

    rng = np.random.default_rng(0)
    total, chunk, sequences = mb * 1_000_000 // 5, 4_000_000, 0
    with StoreWriter(entry) as w:
        for start in range(0, total, chunk):
            lengths = rng.integers(50, 1001, chunk // 400)
            lengths = lengths[np.cumsum(lengths) <= min(chunk, total - start)]
            ids = rng.integers(0, 50_000, int(lengths.sum()), dtype=np.int32)
            w.add(ids, ids % 4 != 0, lengths)
            sequences += len(lengths)
        w.finish({"ok": sequences})
    return sum(f.stat().st_size for f in entry.iterdir()) / 1e6, sequences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 256 MB store and 2M sequences planned")
    p.add_argument("--batches", type=int, default=300, help="micro-batches built from the store")
    args = p.parse_args()
    store_mb, plan_n = (256, 2_000_000) if args.quick else (1000, 10_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        size, sequences = write_store(Path(tmp) / "store", store_mb)
        written = time.perf_counter() - t0
        print(f"token store: {size:.0f} MB, {sequences:,} sequences, written in {written:.1f}s")
        stream = probe(STREAM, str(Path(tmp) / "store"), str(args.batches), "release")
        kept = probe(STREAM, str(Path(tmp) / "store"), str(args.batches), "keep")
        print(
            f"  {args.batches} micro-batches (8 x 2048) in {stream['seconds']:.1f}s: RSS growth {stream['rss']:.1f} MB "
            f"(target <= 100; {kept['rss']:.0f} MB without unmapping what was read), private {stream['anon']:.1f} MB"
        )
        full = probe(FULL_READ, str(Path(tmp) / "store"))
        print(f"  the same columns read whole (the .npz cache's way): {full['anon']:.0f} MB")
    plan = probe(PLAN, str(plan_n))
    print(
        f"row plan of {plan_n:,} sequences: {plan['rows']:,} rows in {plan['seconds']:.1f}s "
        f"(again: {plan['again_s'] * 1e3:.2f} ms, kept), peak growth {plan['peak']:.0f} MB, plan kept {plan['kept']:.0f} MB"
    )
    result = {
        "store_mb": round(size),
        "store_sequences": sequences,
        "batches": args.batches,
        "token_store_rank_growth_mb": round(stream["rss"], 1),
        "token_store_private_growth_mb": round(stream["anon"], 1),
        "token_store_rss_unreleased_mb": round(kept["rss"], 1),
        "full_read_growth_mb": round(full["anon"], 1),
        "stream_s": round(stream["seconds"], 2),
        "plan_sequences": plan_n,
        "row_plan_s": round(plan["seconds"], 2),
        "row_plan_again_ms": round(plan["again_s"] * 1e3, 3),
        "row_plan_peak_growth_mb": round(plan["peak"]),
        "row_plan_kept_mb": round(plan["kept"]),
        "target_met": stream["rss"] <= 100,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
