"""Preference-training throughput: our DPO against TRL's `DPOTrainer`, same model, pairs, template and masks.

    python bench/dpo_throughput.py [--quick]

Model and tokenizer as bench/train_throughput.py: a 2-layer, 128-wide seeded GPT-NeoX with the real
GPT-NeoX-20B tokenizer (50k vocabulary), fp32, the `alpaca` chat template.

Pairs, from ../shared/data/alpaca_en_demo.json (via chatkit.datasets' `alpaca` mapping): the prompt is
the instruction (with its input), the chosen reply its output, the rejected reply the next example's
output. Only pairs whose two sequences fit together in `--max-length` tokens are used (ours keeps a pair
in one row), so both trainers see the same K pairs, one epoch, no truncation. Written twice:
- for ours, chatkit preference JSONL (`messages`, `chosen`, `rejected`), rendered by the template;
- for TRL, standard (non-conversational) rows whose `prompt` is the same template's rendered prompt
  (up to and including "### Response:") and whose `chosen`/`rejected` are the rendered replies
  (" {reply}<|endoftext|>"), which TRL tokenizes itself. The script checks that both sides get the
  same token ids and the same scored tokens, pair by pair, and reports both sides' counts. Our
  sequences carry one more token each, unscored: the template's turn separator ("\\n\\n") after the
  reply, which TRL's rows cannot hold (TRL scores all of a reply and appends an eos to one that does not
  end with it). The ratios therefore count tokens as TRL does (our rates x TRL's / our real tokens of
  the same pairs), so they are ratios of time for the same work.

Runs, each in its own process:
- ours: `python -m chatkit.launch` with method=dpo preference_loss=sigmoid, DeepSpeed ZeRO-0, best-fit
  packing of whole pairs (block-diagonal masks), 1 rank. Its reference log-probabilities are computed
  once before the first step, by the starting model (logged: "reference log-probabilities of N pairs
  computed in Xs"). Reported both ways: `ours_excl_ref_tokens_per_s` (training steps alone) and
  `ours_tokens_per_s`, the honest one, with the reference pass amortised over the epoch: each measured
  token carries its share of the pass, ref_s x (measured tokens / tokens of the whole epoch).
  `ours_over_trl_dpo` uses the latter.
- TRL `padded`: `DPOTrainer` defaults (each step a random batch of pairs padded to its longest sequence,
  the reference model loaded as a second model and run forward in every step, loss_type="sigmoid"),
  with precision and gradient checkpointing set as ours: fp32 (TRL defaults to bf16) and no gradient
  checkpointing (TRL defaults to it; ours does not). `padded_ckpt` (not in the default list) keeps
  TRL's gradient checkpointing, the literal default, which is slower.

Throughput: real (non-padding) tokens of the steps after `--warmup-steps` divided by their wall time,
step end to step end (data, forward, the reference forward for TRL, backward, optimizer); a pair's
real tokens are both its sequences, prompt included, on both sides. Ours reads metrics.jsonl (one row
per step) and recounts each step's tokens from the trainer's own seeded stream; TRL is timed by a
callback and counts its attention mask's ones.

Final line: JSON with ours_tokens_per_s (including the reference pass; _excl_ref without it; our own
token count), trl_dpo_tokens_per_s, ours_over_trl_dpo (including the reference pass, TRL's token count;
target >= 1.5), target_1_5x_met, and both sides' token counts (`tokens`, `tokens_agree`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import REPO, SEED, SHARED, TEMPLATE, build_workspace, free_port, summarize  # noqa: E402

TRL_MODES = ("padded", "padded_ckpt")
REF_LINE = re.compile(r"reference log-probabilities of (\d+) pairs computed in ([0-9.]+)s")


# ---------------------------------------------------------------- pairs, in both formats


def build_pairs(ws: dict, work: Path, pairs: int, max_length: int) -> dict:
    """K preference pairs from the alpaca conversations: chatkit JSONL for ours, prompt/chosen/rejected
    strings (rendered by the same template) for TRL."""
    from transformers import AutoTokenizer

    from chatkit.conversation import Message, Preference, read_jsonl
    from chatkit.data import fit_pair
    from chatkit.templates import get_template
    from chatkit.tokenization import special_tokens

    tok = AutoTokenizer.from_pretrained(ws["model"])
    template = get_template(TEMPLATE, tok)
    eos, bos = special_tokens(tok)
    convs = read_jsonl(ws["train"])
    ours, trl, skipped = [], [], 0
    for i, conv in enumerate(convs):
        if len(ours) == pairs:
            break
        prompt = tuple(conv.messages[:-1])
        chosen = conv.messages[-1].content
        rejected = convs[(i + 1) % len(convs)].messages[-1].content
        pref = Preference(prompt, Message("assistant", chosen), Message("assistant", rejected))
        if fit_pair(tok, template, pref, max_length)[0] is None:
            skipped += 1  # too long for one row (or identical replies): in neither run
            continue
        ours.append(pref.to_dict())
        row = {"prompt": template.render(prompt, eos, bos, add_generation_prompt=True)}
        for side, msgs in zip(("chosen", "rejected"), pref.sequences(), strict=True):
            row[side] = split_reply(template.segments(msgs, eos, bos), row["prompt"])
        trl.append(row)
    if len(ours) < pairs:
        sys.exit(f"only {len(ours)} pairs fit in {max_length} tokens, {pairs} asked for")
    with (work / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ours)
    (work / "trl_pairs.json").write_text(json.dumps(trl, ensure_ascii=False), encoding="utf-8")
    return {
        **ws,
        "pairs": str(work / "pairs.jsonl"),
        "trl_pairs": str(work / "trl_pairs.json"),
        "n_pairs": len(ours),
        "skipped": skipped,
    }


def split_reply(segments, prompt_text: str) -> str:
    """The scored reply text (" {reply}<|endoftext|>") of a rendered prompt + reply. The template puts
    its turn separator ("\\n\\n", never scored) after the reply too; TRL's standard rows end a reply at its
    eos (TRL appends one to a reply that does not end with it, and scores everything after the prompt),
    so TRL gets the reply without it and our sequences are one unscored token longer (reported)."""
    first = next(i for i, seg in enumerate(segments) if seg.trained)
    last = max(i for i, seg in enumerate(segments) if seg.trained)
    assert "".join(seg.text for seg in segments[:first]) == prompt_text, "prompt renders differently"
    assert all(seg.trained for seg in segments[first : last + 1])
    return "".join(seg.text for seg in segments[first : last + 1])


def our_tokenized(ws: dict, max_length: int, cache: Path):
    from transformers import AutoTokenizer

    from chatkit.data import tokenize_file
    from chatkit.templates import get_template

    tok = AutoTokenizer.from_pretrained(ws["model"])
    ts = tokenize_file(
        ws["pairs"], tok, get_template(TEMPLATE), max_length, cache_dir=cache, show_progress=False, pairs=True
    )
    return tok, ts


def check_tokens(ws: dict, trl_ids: list[dict], max_length: int, cache: Path) -> dict:
    """Both sides' real and scored tokens, pair by pair: TRL's prompt + reply ids must be our sequence
    up to its last scored token, and TRL's completion our scored tokens; what ours has after its last
    scored token (the template's separator) is counted."""
    _, ts = our_tokenized(ws, max_length, cache)
    if len(ts) != len(trl_ids):
        sys.exit(f"ours kept {len(ts)} pairs, TRL {len(trl_ids)}")
    differ = trailing = 0
    for i, t in enumerate(trl_ids):
        for seq, reply in (
            (ts.sequence(2 * i), t["chosen_ids"]),
            (ts.sequence(2 * i + 1), t["rejected_ids"]),
        ):
            scored = [label != -100 for label in seq.labels]
            end = max(k for k, m in enumerate(scored) if m) + 1
            trailing += len(scored) - end
            trl_scored = [False] * len(t["prompt_ids"]) + [True] * len(reply)
            differ += (t["prompt_ids"] + reply, trl_scored) != (seq.input_ids[:end], scored[:end])
    return {
        "ours_real_tokens": int(ts.lengths.sum()),
        "ours_scored_tokens": int(ts.trained.sum()),
        "ours_unscored_tokens_after_reply": trailing,
        "trl_real_tokens": sum(
            2 * len(t["prompt_ids"]) + len(t["chosen_ids"]) + len(t["rejected_ids"]) for t in trl_ids
        ),
        "trl_scored_tokens": sum(len(t["chosen_ids"]) + len(t["rejected_ids"]) for t in trl_ids),
        "sequences_differing": differ,
    }


# ---------------------------------------------------------------- our trainer


def step_tokens_ours(ws: dict, rows: int, max_length: int, cache: Path) -> list[int]:
    """Real tokens of each step of the one-rank run, from the trainer's own seeded stream."""
    from chatkit.data import Batches, collate_pairs
    from chatkit.tokenization import padding_id
    from chatkit.train.loss import real_tokens

    tok, ts = our_tokenized(ws, max_length, cache)
    b = Batches([ts], None, rows, max_length, True, 0, 1, SEED, padding_id(tok), collate=collate_pairs)
    stream = b.stream()
    return [real_tokens(next(stream)[1]) for _ in range(b.steps_per_epoch(1))]


def run_ours(ws: dict, work: Path, rows: int, max_length: int, warmup: int) -> dict:
    out = work / "ours"
    cmd = [
        sys.executable, "-m", "chatkit.launch", str(REPO / "config" / "tiny.yaml"),
        f"model={ws['model']}", f"train_files=[{ws['pairs']}]", f"template={TEMPLATE}",
        "method=dpo", "preference_loss=sigmoid", "beta=0.1",
        f"max_length={max_length}", "pack=true", f"micro_batch_size={rows}", "epochs=1",
        "log_every=1", "deepspeed=zero0", "precision=fp32", f"output_dir={out}", "save_every=0",
        "warmup_steps=0", f"seed={SEED}", "tokenize_procs=1", f"cache_dir={work / 'cache'}",
        "--cpu-ranks", "1", "--master-port", str(free_port()),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # the launcher gives each rank its share of the cores
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"our trainer failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    found = REF_LINE.search(proc.stdout + proc.stderr)
    if not found:
        sys.exit("our trainer did not log its reference pass ('reference log-probabilities ... computed in')")
    ref_pairs, ref_s = int(found.group(1)), float(found.group(2))
    rates = [
        r["tokens_per_s"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "tokens_per_s" in r
    ]
    tokens = step_tokens_ours(ws, rows, max_length, work / "cache")
    if len(tokens) != len(rates):
        sys.exit(f"expected {len(tokens)} steps in metrics.jsonl, found {len(rates)}")
    times = [n / r for n, r in zip(tokens, rates, strict=True)]  # each rate is one step's tokens / its time
    res = summarize("ours_excl_ref", tokens, times, warmup, wall)
    measured_tokens, measured_s = sum(tokens[warmup:]), sum(times[warmup:])
    share = ref_s * measured_tokens / sum(tokens)  # the measured steps' share of the one reference pass
    res.update(
        rows_per_step=rows,
        reference_pairs=ref_pairs,
        reference_s=ref_s,
        reference_s_amortised=round(share, 3),
        tokens_per_s_incl_ref=measured_tokens / (measured_s + share),
        epoch_tokens_per_s_incl_ref=sum(tokens) / (sum(times) + ref_s),
    )
    print(f"ours incl. reference: {res['tokens_per_s_incl_ref']:,.0f} real tokens/s", file=sys.stderr)
    return res


# ---------------------------------------------------------------- TRL (runs in a child process)


def trl_worker(ws: dict, mode: str, batch: int, max_length: int, out: Path) -> dict:
    """One DPOTrainer pass over the pairs; per-step real/scored tokens and step-end times."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(ws["model"])
    rows = json.loads(Path(ws["trl_pairs"]).read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=mode == "padded_ckpt",
        max_length=max_length, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-3,
        beta=0.1, loss_type=["sigmoid"], seed=SEED, save_strategy="no", report_to=[], logging_steps=10**9,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps[-1]["end"] = time.perf_counter()

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *a, **kw):
            real = int(inputs["attention_mask"].sum())  # both sequences of every pair, padding excluded
            scored = int(inputs["completion_mask"][:, 1:].sum())
            steps.append({"real": real, "scored": scored, "padded": int(inputs["input_ids"].numel())})
            return super().training_step(model, inputs, *a, **kw)

    # ref_model=None: DPOTrainer loads the reference itself, a second copy run forward in every step
    trainer = Counting(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Timer()],
    )
    data = trainer.train_dataset
    ids = [{k: data[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(data))]
    (out / "ids.json").write_text(json.dumps(ids))
    t_start = time.perf_counter()
    trainer.train()
    ends = [t_start] + [s["end"] for s in steps]
    return {
        "tokens": [s["real"] for s in steps],
        "scored": sum(s["scored"] for s in steps),
        "padded": sum(s["padded"] for s in steps),
        "times": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "ids": str(out / "ids.json"),
        "ref_model_separate": trainer.ref_model is not None,
    }


def run_trl(ws: dict, work: Path, mode: str, batch: int, max_length: int, warmup: int) -> tuple[dict, list]:
    out = work / f"trl_{mode}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--trl-worker", json.dumps({"ws": ws, "mode": mode, "batch": batch,
           "max_length": max_length, "out": str(out)})]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"TRL {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    res = summarize(f"trl_{mode}", r["tokens"], r["times"], warmup, time.perf_counter() - t0)
    res.update(
        batch_pairs=batch,
        scored_tokens=r["scored"],
        padded_tokens=r["padded"],
        padding_share=round(1 - sum(r["tokens"]) / r["padded"], 4),
        reference_model_each_step=r["ref_model_separate"],
    )
    return res, json.loads(Path(r["ids"]).read_text())


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="48 pairs, 1 warm-up step (default 256, 2)")
    p.add_argument("--pairs", type=int, help="preference pairs per run (overrides --quick)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--rows-per-step", type=int, default=4, help="our packed rows per step")
    p.add_argument("--trl-batch", type=int, default=8, help="TRL pairs per step (TrainingArguments' default)")
    p.add_argument("--trl-modes", default="padded", help=f"comma-separated, of {', '.join(TRL_MODES)}")
    p.add_argument("--warmup-steps", type=int, help="steps left out of every measurement")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        w = json.loads(args.trl_worker)
        print(json.dumps(trl_worker(w["ws"], w["mode"], w["batch"], w["max_length"], Path(w["out"]))))
        return
    if not (SHARED / "20B_tokenizer.json").is_file():
        sys.exit(f"needs {SHARED} (the shared data beside the repository)")
    n_pairs = args.pairs or (48 if args.quick else 256)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.quick else 2)
    modes = args.trl_modes.split(",")
    import torch

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        # every alpaca conversation (pairs too long for a row are skipped, so more are needed than K)
        ws = build_workspace(work, 10**6, args.layers, args.hidden, args.max_length)
        ws = build_pairs(ws, work, n_pairs, args.max_length)
        ours = run_ours(ws, work, args.rows_per_step, args.max_length, warmup)
        trl_runs, tokens = [], None
        for mode in modes:
            res, ids = run_trl(ws, work, mode, args.trl_batch, args.max_length, warmup)
            trl_runs.append(res)
            tokens = tokens or check_tokens(ws, ids, args.max_length, work / "cache")
    result = report(ours, trl_runs, tokens)
    result.update(
        pairs=ws["n_pairs"], pairs_skipped_too_long=ws["skipped"], max_length=args.max_length,
        rows_per_step=args.rows_per_step, trl_batch_pairs=args.trl_batch, warmup_steps=warmup,
        threads=torch.get_num_threads(), layers=args.layers, hidden=args.hidden, template=TEMPLATE,
    )  # fmt: skip
    print(json.dumps(result))


def report(ours: dict, trl_runs: list[dict], tokens: dict) -> dict:
    """Rates and ratios. The ratios count both sides' tokens as TRL does: ours carries one unscored
    separator token per sequence that TRL's rows lack (see `split_reply`), so our rates are scaled by
    trl_real / ours_real tokens of the same pairs (a ratio of times for the same work)."""
    same = tokens["trl_real_tokens"] / tokens["ours_real_tokens"]
    incl, excl = ours["tokens_per_s_incl_ref"], ours["tokens_per_s"]
    out: dict = {
        "bench": "dpo_throughput",
        "ours_tokens_per_s": round(incl, 1),
        "ours_excl_ref_tokens_per_s": round(excl, 1),
        "ours_tokens_per_s_trl_count": round(incl * same, 1),
        "ours_reference_s": ours["reference_s"],
    }
    for r in trl_runs:
        out[f"{r['run']}_tokens_per_s"] = round(r["tokens_per_s"], 1)
    by = {r["run"]: r for r in trl_runs}
    base = by.get("trl_padded") or trl_runs[0]
    out["trl_dpo_tokens_per_s"] = round(base["tokens_per_s"], 1)
    out["trl_dpo_run"] = base["run"]
    out["ours_over_trl_dpo"] = round(incl * same / base["tokens_per_s"], 3)
    out["ours_excl_ref_over_trl_dpo"] = round(excl * same / base["tokens_per_s"], 3)
    if "trl_padded_ckpt" in by:
        out["ours_over_trl_dpo_ckpt"] = round(incl * same / by["trl_padded_ckpt"]["tokens_per_s"], 3)
    out["target_1_5x_met"] = out["ours_over_trl_dpo"] >= 1.5
    out["tokens"] = tokens
    out["tokens_agree"] = (
        tokens["sequences_differing"] == 0
        and tokens["ours_scored_tokens"] == tokens["trl_scored_tokens"]
        and tokens["ours_real_tokens"]
        == tokens["trl_real_tokens"] + tokens["ours_unscored_tokens_after_reply"]
    )
    runs = [ours, *trl_runs]
    out["runs"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs]
    return out


if __name__ == "__main__":
    main()
