"""Training throughput: our trainer against TRL's `SFTTrainer`, same model, data, template and masks.

    python bench/train_throughput.py [--quick]

Model: a 2-layer, 128-wide GPT-NeoX (seeded) with the real GPT-NeoX-20B tokenizer (50k vocabulary, so
the lm head dominates the compute), saved as a Hugging Face folder with the `alpaca` chat template.
Data: the first K conversations of ../shared/data/alpaca_en_demo.json (via chatkit.datasets' `alpaca`
mapping), loss on the assistant replies only, rows of at most 1,024 tokens, fp32, one epoch.

Same number of trained tokens: every run makes one pass over the same K conversations (rather than a
fixed number of steps, whose token content would differ between padded and packed batches). Our
trainer drops the last packed rows that do not fill a whole step; the JSON reports the real and trained
tokens each run processed. `trained_tokens` (our labels over all K conversations) equals each TRL run's
`trained_tokens`: the same tokens, template and assistant-only masks on both sides. Throughput is measured over the steps after `--warmup-steps`: real
(non-padding) tokens of those steps divided by their wall time, step end to step end (data loading,
forward, backward and optimizer included on both sides).

Runs, each in its own process:
- ours: `python -m chatkit.launch` (DeepSpeed ZeRO-0, best-fit packing, block-diagonal 4D masks), on 1
  rank (the fair comparison with TRL's single process) and on 2 ranks; tokens/s read from metrics.jsonl.
- TRL padded: `SFTTrainer` defaults (random batches padded to their longest member).
- TRL grouped: `train_sampling_strategy="group_by_length"` (padded, batches of similar lengths).
- TRL packed: `packing=True` (best-fit "bfd", padding-free: a step's rows are one flat sequence with
  restarting `position_ids` and no attention mask). Whether that keeps examples apart on CPU depends on
  transformers deriving a block-diagonal mask from the position_ids (5.23 does when there is neither an
  attention_mask nor a KV cache, as in TRL's training forward). The script checks it on TRL's own
  collated row and reports `trl_packed_isolates_examples`; only then does packed count as keeping
  examples apart. It gets `--trl-packed-batch` rows per step (4, as many rows as ours).

MFU = model FLOP/s / fp32 matmul peak, the peak measured in this run (square torch.matmul on all
threads). Model FLOPs of a conversation of n tokens (useful work only; padding and masked-out attention
are waste and not counted):
    6 * N * n  +  6 * d * V * n  +  12 * L * d * n(n+1)/2
N = non-embedding parameters (attention, MLP, norms), d = hidden size, V = vocabulary, L = layers; the
last term is causal attention (QK^T and AV, 2 * 2 * d per attended position per layer, forward x3).

Final line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TEMPLATE = "alpaca"
SEED = 0
TRL_MODES = ("padded", "grouped", "packed")


# ---------------------------------------------------------------- setup: model, data, peak


def build_workspace(work: Path, examples: int, layers: int, hidden: int, max_length: int) -> dict:
    """Tiny GPT-NeoX + 20B tokenizer folder and a conversation JSONL of the first `examples` rows."""
    from transformers import PreTrainedTokenizerFast

    from chatkit.conversation import read_jsonl, write_conversations
    from chatkit.datasets import get_dataset
    from chatkit.datasets.prepare import prepare
    from chatkit.models import ModelSpec, build_model, save_base

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(SHARED / "20B_tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|padding|>"
    )
    spec = ModelSpec(
        name="bench",
        architecture="gpt_neox",
        template=TEMPLATE,
        config=dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_length,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
    )
    model = build_model(spec, tok, seed=SEED)
    save_base(model, tok, work / "model", TEMPLATE)
    prepare(
        get_dataset("alpaca"),
        ["--source", str(SHARED / "alpaca_en_demo.json"), "--out", str(work / "all"), "--val-fraction", "0"],
    )
    convs = read_jsonl(work / "all" / "train.jsonl")[:examples]
    write_conversations(work / "train.jsonl", convs)
    return {"model": str(work / "model"), "train": str(work / "train.jsonl"), "conversations": len(convs)}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul on all of torch's threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def model_flops(model_dir: str, lengths: list[int]) -> tuple[float, dict]:
    """Training FLOPs per real token, averaged over the conversations (formula in the docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(cfg)
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    n_params = sum(p.numel() for p in model.parameters() if id(p) not in emb)
    d, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    total = sum(6 * n_params * n + 6 * d * v * n + 12 * layers * d * n * (n + 1) / 2 for n in lengths)
    tokens = sum(lengths)
    info = {"non_embedding_params": n_params, "hidden": d, "vocab": v, "layers": layers}
    return total / tokens, info


# ---------------------------------------------------------------- our trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_tokens_ours(ws: dict, rows_per_rank: int, ranks: int, max_length: int, cache: Path):
    """Real tokens of each optimizer step and trained tokens in all, from the trainer's own seeded stream."""
    from transformers import AutoTokenizer

    from chatkit.data import Batches, tokenize_file
    from chatkit.templates import get_template
    from chatkit.train.loss import real_tokens, trained_count

    tok = AutoTokenizer.from_pretrained(ws["model"])
    ts = tokenize_file(
        ws["train"], tok, get_template(TEMPLATE), max_length, cache_dir=cache, show_progress=False
    )
    per_rank, trained = [], 0
    for rank in range(ranks):
        b = Batches([ts], None, rows_per_rank, max_length, True, rank, ranks, SEED, tok.pad_token_id)
        stream = b.stream()
        batches = [next(stream)[1] for _ in range(b.steps_per_epoch(1))]
        per_rank.append([real_tokens(x) for x in batches])
        trained += sum(trained_count(x) for x in batches)
    return [sum(s) for s in zip(*per_rank, strict=True)], trained


def run_ours(ws: dict, work: Path, ranks: int, rows_per_step: int, max_length: int, warmup: int) -> dict:
    out = work / f"ours_{ranks}"
    per_rank = max(1, rows_per_step // ranks)
    cmd = [
        sys.executable, "-m", "chatkit.launch", str(REPO / "config" / "tiny.yaml"),
        f"model={ws['model']}", f"train_files=[{ws['train']}]", f"template={TEMPLATE}",
        f"max_length={max_length}", "pack=true", f"micro_batch_size={per_rank}", "epochs=1",
        "log_every=1", "deepspeed=zero0", "precision=fp32", f"output_dir={out}", "save_every=0",
        "warmup_steps=0", f"seed={SEED}", "tokenize_procs=1", f"cache_dir={work / 'cache'}",
        "--cpu-ranks", str(ranks), "--master-port", str(free_port()),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # the launcher gives each rank its share of the cores
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"our trainer failed ({ranks} ranks):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rates = [
        r["tokens_per_s"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "tokens_per_s" in r
    ]
    tokens, trained = step_tokens_ours(ws, per_rank, ranks, max_length, work / "cache")
    if len(tokens) != len(rates):
        sys.exit(f"expected {len(tokens)} steps in metrics.jsonl, found {len(rates)}")
    times = [n / r for n, r in zip(tokens, rates, strict=True)]  # each rate is one step's tokens / its time
    res = summarize(f"ours_{ranks}rank", tokens, times, warmup, time.perf_counter() - t0)
    res.update(trained_tokens=trained, rows_per_rank=per_rank)
    return res


def summarize(name: str, tokens: list[int], times: list[float], warmup: int, wall: float) -> dict:
    """Aggregate real tokens/s over the steps after warm-up."""
    if len(tokens) <= warmup:
        sys.exit(f"{name}: only {len(tokens)} steps, need more than --warmup-steps {warmup}")
    n, t = sum(tokens[warmup:]), sum(times[warmup:])
    print(
        f"{name}: {n / t:,.0f} real tokens/s over {len(tokens) - warmup} steps, {wall:.0f} s", file=sys.stderr
    )
    return {
        "run": name,
        "steps": len(tokens),
        "measured_steps": len(tokens) - warmup,
        "real_tokens": sum(tokens),
        "tokens_per_s": n / t,
        "median_step_s": statistics.median(times[warmup:]),
        "wall_s": round(wall, 1),
    }


# ---------------------------------------------------------------- TRL (runs in a child process)


def trl_worker(ws: dict, mode: str, batch: int, max_length: int, out: Path) -> dict:
    """One SFTTrainer pass over the conversations; per-step real/trained tokens and step-end times."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from chatkit.conversation import read_jsonl

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(ws["model"])  # its chat_template has {% generation %} blocks
    rows = [{"messages": [m.to_dict() for m in c.messages]} for c in read_jsonl(ws["train"])]
    model = AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.float32, attn_implementation="sdpa")
    extra = {
        "padded": {},
        "grouped": {"train_sampling_strategy": "group_by_length"},
        "packed": {"packing": True},
    }[mode]
    args = SFTConfig(
        output_dir=str(out), use_cpu=True, assistant_only_loss=True, max_length=max_length,
        per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-3, seed=SEED,
        save_strategy="no", report_to=[], logging_steps=10**9, disable_tqdm=True,
        dataloader_num_workers=0, **extra,
    )  # fmt: skip
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps[-1]["end"] = time.perf_counter()

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            if "attention_mask" in inputs:  # padded: real tokens are the mask's ones
                real = int(inputs["attention_mask"].sum())
            else:  # padding-free: one row of real tokens
                real = int(inputs["input_ids"].numel())
            steps.append({"real": real, "trained": int((inputs["labels"][:, 1:] != -100).sum())})
            return super().training_step(model, inputs, *a, **kw)

    trainer = Counting(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Timer()],
    )
    isolates = None
    if mode == "packed":
        isolates = packed_isolation(trainer)
    t_start = time.perf_counter()
    trainer.train()
    ends = [t_start] + [s["end"] for s in steps]
    data = trainer.train_dataset
    return {
        "tokens": [s["real"] for s in steps],
        "trained": sum(s["trained"] for s in steps),
        "times": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "dataset_tokens": sum(len(x) for x in data["input_ids"]),
        "isolates": isolates,
    }


def packed_isolation(trainer) -> float:
    """Largest logit difference between the 2nd example of TRL's packed, collated row and that example alone.

    Called as TRL's compute_loss calls the model (use_cache=False, no attention_mask): transformers then
    derives a block-diagonal mask from the restarting position_ids. With an attention_mask or a KV cache
    it does not, and packed examples attend to each other.
    """
    import torch

    data, model = trainer.train_dataset, trainer.model
    row = next(i for i in range(len(data)) if len(data[i]["seq_lengths"]) > 1)
    batch = trainer.data_collator([data[row]])
    first = int(data[row]["seq_lengths"][0])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0, first : first + 8]
        alone = model(input_ids=batch["input_ids"][:, first : first + 8], use_cache=False).logits[0]
    model.train()
    return float((packed - alone).abs().max())


def run_trl(ws: dict, work: Path, mode: str, batch: int, max_length: int, warmup: int) -> dict:
    """One TRL mode in a fresh process (its own memory and threads), summarized like ours."""
    out = work / f"trl_{mode}"
    cmd = [sys.executable, __file__, "--trl-worker", json.dumps({"ws": ws, "mode": mode, "batch": batch,
           "max_length": max_length, "out": str(out)})]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"TRL {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    res = summarize(f"trl_{mode}", r["tokens"], r["times"], warmup, time.perf_counter() - t0)
    res.update(trained_tokens=r["trained"], dataset_tokens=r["dataset_tokens"], batch=batch)
    if r["isolates"] is not None:  # max logit difference, packed vs alone
        res["isolation_max_logit_diff"] = r["isolates"]
        res["isolates_examples"] = r["isolates"] < 1e-4
    return res


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="96 conversations, 1 warm-up step (default 320, 2)")
    p.add_argument("--examples", type=int, help="conversations per run (overrides --quick)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--rows-per-step", type=int, default=4, help="our packed rows per step, all ranks")
    p.add_argument("--trl-batch", type=int, default=8, help="TRL examples per step, padded and grouped")
    p.add_argument("--trl-packed-batch", type=int, default=4, help="TRL packed rows per step")
    p.add_argument("--ranks", default="1,2", help="our trainer's CPU ranks, comma-separated")
    p.add_argument("--trl-modes", default=",".join(TRL_MODES))
    p.add_argument("--warmup-steps", type=int, help="steps left out of every measurement")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        w = json.loads(args.trl_worker)
        print(json.dumps(trl_worker(w["ws"], w["mode"], w["batch"], w["max_length"], Path(w["out"]))))
        return
    if not (SHARED / "20B_tokenizer.json").is_file():
        sys.exit(f"needs {SHARED} (the shared data beside the repository)")
    examples = args.examples or (96 if args.quick else 320)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.quick else 2)
    import torch

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ws = build_workspace(work, examples, args.layers, args.hidden, args.max_length)
        peak = matmul_peak()
        runs = [run_ours(ws, work, int(r), args.rows_per_step, args.max_length, warmup)
                for r in args.ranks.split(",")]  # fmt: skip
        lengths, trained = lengths_of(ws, args.max_length, work / "cache")
        runs += [run_trl(ws, work, m, args.trl_packed_batch if m == "packed" else args.trl_batch,
                         args.max_length, warmup)
                 for m in args.trl_modes.split(",")]  # fmt: skip
        peak = max(peak, matmul_peak())  # best of before and after: the machine may be shared
        flops_per_token, model_info = model_flops(ws["model"], lengths)
    result = report(runs, peak, flops_per_token)
    result.update(
        conversations=ws["conversations"], tokens=sum(lengths), trained_tokens=trained,
        max_length=args.max_length,
        rows_per_step=args.rows_per_step, trl_batch=args.trl_batch, trl_packed_batch=args.trl_packed_batch,
        warmup_steps=warmup,
        threads=torch.get_num_threads(), model=model_info, template=TEMPLATE,
    )  # fmt: skip
    print(json.dumps(result))


def lengths_of(ws: dict, max_length: int, cache: Path) -> tuple[list[int], int]:
    """Token count of each conversation, and trained tokens in all, as our tokenizer labels them."""
    from transformers import AutoTokenizer

    from chatkit.data import tokenize_file
    from chatkit.templates import get_template

    tok = AutoTokenizer.from_pretrained(ws["model"])
    ts = tokenize_file(
        ws["train"], tok, get_template(TEMPLATE), max_length, cache_dir=cache, show_progress=False
    )
    return [int(n) for n in ts.lengths], int(ts.trained.sum())


def report(runs: list[dict], peak: float, flops_per_token: float) -> dict:
    """Per-run tokens/s and MFU, and the ratios the issue's done-when asks for."""
    by = {r["run"]: r for r in runs}
    out: dict = {"bench": "train_throughput", "peak_gflops_fp32": round(peak / 1e9, 1),
                 "model_gflop_per_token": round(flops_per_token / 1e9, 5)}  # fmt: skip
    for r in runs:
        name = r["run"]
        out[f"{name}_tokens_per_s"] = round(r["tokens_per_s"], 1)
        out[f"{name}_mfu"] = round(r["tokens_per_s"] * flops_per_token / peak, 4)
    out["runs"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs]
    ours = by.get("ours_1rank")
    apart = [r for r in runs if r["run"] in ("trl_padded", "trl_grouped") or r.get("isolates_examples")]
    if "trl_packed" in by:
        out["trl_packed_isolates_examples"] = by["trl_packed"].get("isolates_examples")
    if ours and "trl_padded" in by:
        out["ours_over_trl_padded"] = round(ours["tokens_per_s"] / by["trl_padded"]["tokens_per_s"], 3)
        out["target_1_5x_padded_met"] = out["ours_over_trl_padded"] >= 1.5
    if ours and apart:
        best = max(apart, key=lambda r: r["tokens_per_s"])
        out["trl_best_apart"] = best["run"]
        out["ours_over_trl_best_apart"] = round(ours["tokens_per_s"] / best["tokens_per_s"], 3)
        out["target_not_worse_than_best_apart_met"] = out["ours_over_trl_best_apart"] >= 1.0
    if ours and "trl_packed" in by:
        out["ours_over_trl_packed"] = round(ours["tokens_per_s"] / by["trl_packed"]["tokens_per_s"], 3)
    return out


if __name__ == "__main__":
    main()
