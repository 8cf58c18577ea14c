"""Long packed rows: memory and time of one training step, dense (T, T) mask against padding-free varlen.

    python bench/long_context.py --quick   # T = 2K, 8K, 32K; dense paths up to 8K (a few minutes on 2 cores)
    python bench/long_context.py           # dense paths up to 32K too (the dense mask alone is 4 GiB)

Model: a seeded tiny Llama (2 layers, 128 wide, 4 heads over 2 key/value heads, 512-token vocabulary),
fp32. Input: one packed row of exactly T tokens made of conversations of 64 to 2,048 random tokens
(collated by chatkit.data.collate_rows, so positions restart per conversation), every token trained.
One step = forward, summed next-token cross-entropy, backward. Paths:

- dense: the old training path: chatkit.data.block_causal_mask, an additive fp32 (B, 1, T, T) mask,
  passed to the `sdpa` implementation with the restarting positions;
- sdpa: no mask from chatkit; transformers finds the packed sequences from the positions and builds
  a boolean (B, 1, T, T) mask itself (attention=sdpa);
- varlen: chatkit.train.attention (attention=varlen, the default): SDPA per conversation, no mask.

Each (path, T) runs in a fresh Python process. Memory: on CPU the peak resident set (VmHWM, reset
through /proc/self/clear_refs once the model and the row are built) minus the resident set at that
moment, i.e. what the step adds; on CUDA, torch.cuda.max_memory_allocated over the step minus what was
allocated before. Time: the step's wall time (the best of --steps, after a warm-up step on a short
row). The losses of the paths at equal T are compared (they must agree: the same row, the same
isolation). Final line: JSON, with
`memory_ratio_32k_over_8k` of varlen (target at most 5: linear memory gives 4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = (2048, 8192, 32768)
PATHS = ("dense", "sdpa", "varlen")
MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768)  # fmt: skip


def packed_row(t: int, seed: int = 0):
    """One row of exactly `t` tokens: conversations of 64-2,048 tokens, the last one what is left."""
    import random

    from chatkit.data import collate_rows
    from chatkit.tokenization import Encoded

    rng = random.Random(seed)
    examples, left = [], t
    while left:
        n = min(left, rng.randint(64, 2048))
        ids = [rng.randrange(MODEL["vocab_size"]) for _ in range(n)]
        examples.append(Encoded(ids, ids))
        left -= n
    return collate_rows([examples], pad_id=0), len(examples)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(path: str, t: int, steps: int) -> dict:
    """One (path, T) case in this process: the step's added peak memory (bytes), best time, loss."""
    import time

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatkit.data import block_causal_mask
    from chatkit.train.attention import packed_forward_kwargs, register

    register()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attn = "sdpa" if path == "dense" else path
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(attn_implementation=attn, **MODEL)).to(device).train()

    def step(batch: dict[str, torch.Tensor]) -> float:
        if path == "dense":  # built inside the step: its memory is the path's
            mask = block_causal_mask(batch["segment_ids"], torch.float32)
            kwargs = {"attention_mask": mask, "position_ids": batch["position_ids"], "use_cache": False}
        else:
            kwargs = packed_forward_kwargs(batch["position_ids"], attn)
        logits = model(input_ids=batch["input_ids"], **kwargs).logits
        loss = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100, reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=False)
        return float(loss.detach()) / int((batch["labels"][0, 1:] != -100).sum())

    for p in model.parameters():  # gradient buffers exist before the baseline: every path has them
        p.grad = torch.zeros_like(p)
    step({k: v.to(device) for k, v in packed_row(256)[0].items()})  # warm-up: lazy initialisations
    batch, conversations = packed_row(t)
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        base = _rss("VmRSS:")
    times, loss = [], 0.0
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM:")
    return {"path": path, "tokens": t, "conversations": conversations, "device": device.type,
            "step_added_mb": round((peak - base) / 2**20, 1), "seconds": round(min(times), 3),
            "loss": loss}  # fmt: skip


def run_case(path: str, t: int, steps: int) -> dict:
    """`worker` in a fresh Python process (so one case's peak cannot hide another's)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps({"path": path, "t": t, "steps": steps})]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} at T={t} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(cases: list[dict], sizes: list[int]) -> dict:
    """Peak memory and time per path and T (null where a path was skipped), and the target ratio."""
    out: dict = {"bench": "long_context", "device": cases[0]["device"] if cases else None, "model": MODEL}
    by = {(c["path"], c["tokens"]): c for c in cases}
    for path in PATHS:
        for t in sizes:
            c = by.get((path, t))
            out[f"{path}_{t // 1024}k_mb"] = c["step_added_mb"] if c else None
            out[f"{path}_{t // 1024}k_s"] = c["seconds"] if c else None
    v8, v32 = by.get(("varlen", 8192)), by.get(("varlen", 32768))
    ratio = round(v32["step_added_mb"] / v8["step_added_mb"], 2) if v8 and v32 else None
    out["memory_ratio_32k_over_8k"] = ratio
    out["target_ratio_at_most_5_met"] = ratio is not None and ratio <= 5
    d8 = by.get(("dense", 8192))
    if d8 and v8:
        out["dense_over_varlen_memory_8k"] = round(d8["step_added_mb"] / v8["step_added_mb"], 2)
    diffs = [
        abs(c["loss"] - by[("varlen", c["tokens"])]["loss"]) for c in cases if ("varlen", c["tokens"]) in by
    ]
    out["max_loss_diff_vs_varlen"] = max(diffs) if diffs else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="dense and sdpa up to 8K only, 1 step per case")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="row lengths T, comma-separated")
    p.add_argument("--dense-max", type=int, help="largest T for the dense and sdpa paths (quick: 8192)")
    p.add_argument("--steps", type=int, help="steps per case, the fastest is reported (quick: 1, else 2)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        w = json.loads(args.worker)
        print(json.dumps(worker(w["path"], w["t"], w["steps"])))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    dense_max = args.dense_max or (8192 if args.quick else max(sizes))
    steps = args.steps or (1 if args.quick else 2)
    cases = []
    for t in sizes:
        for path in PATHS:
            if path != "varlen" and t > dense_max:
                continue
            case = run_case(path, t, steps)
            print(f"{path:7s} T={t:6d}  +{case['step_added_mb']:9.1f} MB  {case['seconds']:7.2f} s  "
                  f"loss {case['loss']:.6f}", flush=True)  # fmt: skip
            cases.append(case)
    result = report(cases, sizes)
    result.update(steps=steps, dense_max=dense_max)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
