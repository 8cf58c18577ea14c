"""A training rank's memory when the data or the model outgrows RAM: the token store, the epoch's row
plan, and loading a pipeline stage.

    python bench/load_memory.py            # a 1 GB token store; a row plan of 10M sequences; a 1.1 GB model
    python bench/load_memory.py --quick    # a 256 MB store; a row plan of 2M sequences; a 0.3 GB model
    python bench/load_memory.py --only pipeline   # one section (store, plan or pipeline)

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
- pipeline_rank_peak_over_model: a GPT-NeoX model the bench writes as fp32 safetensors (1.1 GB; 0.3
  GB with --quick) loaded as 2 pipeline stages on 2 CPU ranks (DeepSpeed, DS_ACCELERATOR=cpu, gloo):
  each rank's peak RSS growth (VmHWM after a reset) while it builds the model on the meta device and
  the PipelineModule that reads its own layers (chatkit.train.pipeline_model), over the model's size.
  Target: <= 0.6 (a stage holds about half). pipeline_old_rank_peak_over_model: the same through the
  path this replaced, `from_pretrained` of the whole model in fp32 on every rank, then the stage.

Final line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
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


STAGE = (
    MEMORY
    + """
import os
import torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist
from accelerate import init_empty_weights
from deepspeed.pipe import PipelineModule
from transformers import AutoModelForCausalLM
from transformers.models.gpt_neox import modeling_gpt_neox
from chatkit.train.pipeline import make_topology
from chatkit.train.pipeline_model import build_pipeline, empty_model

path, how = sys.argv[1], sys.argv[2]
loss = lambda logits, labels: logits.sum()
dist.barrier()
Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
before = memory()
t0 = time.perf_counter()
if how == "stage":
    model = empty_model(path, torch.float32, attn_implementation="sdpa")
    module = build_pipeline(model, make_topology(2, 2), loss, weights=path)
else:  # the replaced path: the whole model in fp32, then the stage's layers kept
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    module = build_pipeline(model, make_topology(2, 2), loss)
seconds = time.perf_counter() - t0
# read every weight the stage holds once, as deepspeed.initialize does (device move, flattening): a
# whole model loaded by from_pretrained is memory-mapped from fp32 files and counts only when read
checksum = sum(float(p.detach().sum()) for p in module.parameters())
after = memory()
held = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
print(json.dumps({"rank": dist.get_rank(), "peak": after["VmHWM"] - before["VmRSS"], "held": held,
                  "seconds": seconds}))
"""
)


def probe(script: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"probe failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ranks(script: str, n: int, *args: str) -> list[dict]:
    """`script` on `n` CPU ranks of one DeepSpeed group (gloo), as the launcher starts them."""
    from chatkit.launch import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n)},
        )  # fmt: skip
        for r in range(n)
    ]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("rank failed:\n" + "\n".join(err[-3000:] for _, err in outs))
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def write_model(folder: Path, hidden: int, layers: int, dtype: str = "fp32") -> tuple[float, int]:
    """A GPT-NeoX of this shape (vocabulary 50,304) as safetensors in `dtype`, written tensor by tensor
    from seeded random values (never the whole model in memory); (MB on disk, parameters)."""
    import torch
    from transformers import GPTNeoXConfig

    from chatkit.convert.weights import DTYPES, TensorRef, write_weights
    from chatkit.train.pipeline_model import empty_model

    config = GPTNeoXConfig(
        vocab_size=50_304, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    model = empty_model(folder, torch.float32, attn_implementation="sdpa")

    def random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02

    refs = [
        TensorRef(name, tuple(p.shape), torch.float32, lambda shape=tuple(p.shape), i=i: random(shape, i))
        for i, (name, p) in enumerate(model.state_dict().items())
    ]
    write_weights(folder, refs, max_shard_size="400MB", dtype=DTYPES[dtype])
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    return size, sum(r.numel for r in refs)


def pipeline_section(quick: bool) -> dict:
    """Peak RSS growth of each of 2 pipeline ranks loading a model the bench writes, by the stage path
    and by the replaced whole-model path; then both again from a 16-bit copy of the model (checkpoints
    are published in 16 bits: GPT-NeoX-20B in fp16), which the old path converted whole to fp32."""
    hidden, layers = (512, 8) if quick else (1024, 14)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, bf16 = Path(tmp) / "fp32", Path(tmp) / "bf16"
        size, params = write_model(fp32, hidden, layers)
        write_model(bf16, hidden, layers, "bf16")
        print(
            f"pipeline: a {params / 1e6:.0f}M-parameter GPT-NeoX, {size:.0f} MB fp32, 2 stages on 2 CPU ranks"
        )
        runs = {
            "stage load": ranks(STAGE, 2, str(fp32), "stage"),
            "whole model first": ranks(STAGE, 2, str(fp32), "whole"),
            "stage load, bf16 files": ranks(STAGE, 2, str(bf16), "stage"),
            "whole model first, bf16 files": ranks(STAGE, 2, str(bf16), "whole"),
        }
    ratio = {label: max(r["peak"] for r in rows) / size for label, rows in runs.items()}
    for label, rows in runs.items():
        each = ", ".join(f"rank {r['rank']} {r['peak']:.0f} MB (holds {r['held']:.0f})" for r in rows)
        print(f"  {label}: peak RSS growth {each}; {ratio[label]:.2f} x the fp32 model")
    new = runs["stage load"]
    return {
        "pipeline_model_mb": round(size),
        "pipeline_model_params": params,
        "pipeline_rank_peak_mb": [round(r["peak"]) for r in new],
        "pipeline_rank_held_mb": [round(r["held"]) for r in new],
        "pipeline_rank_peak_over_model": round(ratio["stage load"], 3),
        "pipeline_old_rank_peak_over_model": round(ratio["whole model first"], 3),
        "pipeline_bf16_files_rank_peak_over_model": round(ratio["stage load, bf16 files"], 3),
        "pipeline_old_bf16_files_rank_peak_over_model": round(ratio["whole model first, bf16 files"], 3),
        "pipeline_load_s": round(max(r["seconds"] for r in new), 2),
        "pipeline_target_met": ratio["stage load"] <= 0.6,
    }


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


def store_section(store_mb: int, batches: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        size, sequences = write_store(Path(tmp) / "store", store_mb)
        written = time.perf_counter() - t0
        print(f"token store: {size:.0f} MB, {sequences:,} sequences, written in {written:.1f}s")
        stream = probe(STREAM, str(Path(tmp) / "store"), str(batches), "release")
        kept = probe(STREAM, str(Path(tmp) / "store"), str(batches), "keep")
        print(
            f"  {batches} micro-batches (8 x 2048) in {stream['seconds']:.1f}s: RSS growth {stream['rss']:.1f} MB "
            f"(target <= 100; {kept['rss']:.0f} MB without unmapping what was read), private {stream['anon']:.1f} MB"
        )
        full = probe(FULL_READ, str(Path(tmp) / "store"))
        print(f"  the same columns read whole (the .npz cache's way): {full['anon']:.0f} MB")
    return {
        "store_mb": round(size),
        "store_sequences": sequences,
        "batches": batches,
        "token_store_rank_growth_mb": round(stream["rss"], 1),
        "token_store_private_growth_mb": round(stream["anon"], 1),
        "token_store_rss_unreleased_mb": round(kept["rss"], 1),
        "full_read_growth_mb": round(full["anon"], 1),
        "stream_s": round(stream["seconds"], 2),
        "target_met": stream["rss"] <= 100,
    }


def plan_section(plan_n: int) -> dict:
    plan = probe(PLAN, str(plan_n))
    print(
        f"row plan of {plan_n:,} sequences: {plan['rows']:,} rows in {plan['seconds']:.1f}s "
        f"(again: {plan['again_s'] * 1e3:.2f} ms, kept), peak growth {plan['peak']:.0f} MB, plan kept {plan['kept']:.0f} MB"
    )
    return {
        "plan_sequences": plan_n,
        "row_plan_s": round(plan["seconds"], 2),
        "row_plan_again_ms": round(plan["again_s"] * 1e3, 3),
        "row_plan_peak_growth_mb": round(plan["peak"]),
        "row_plan_kept_mb": round(plan["kept"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="a 256 MB store, 2M sequences planned, a 0.3 GB model"
    )
    p.add_argument("--batches", type=int, default=300, help="micro-batches built from the store")
    p.add_argument("--only", choices=("store", "plan", "pipeline"), help="run one section")
    args = p.parse_args()
    store_mb, plan_n = (256, 2_000_000) if args.quick else (1000, 10_000_000)
    result: dict = {}
    if args.only in (None, "store"):
        result |= store_section(store_mb, args.batches)
    if args.only in (None, "plan"):
        result |= plan_section(plan_n)
    if args.only in (None, "pipeline"):
        result |= pipeline_section(args.quick)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
