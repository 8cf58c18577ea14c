"""Data-stage throughput: prepare + tokenize, cached reload, and padding with and without packing.

    python bench/data_throughput.py [--quick]

Uses the real GPT-NeoX-20B tokenizer and the 999 real Alpaca rows in ../shared/data. Side by side:
our multi-process, segment-labelled tokenizer against a plain single-process loop over
`tokenizer.apply_chat_template` (what a script without chatkit does). Final line: JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def padding_fraction(lengths: list[int], batch: int, seed: int = 0) -> float:
    """Random batches padded to their longest member."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for i in range(0, len(order) - batch + 1, batch):
        group = [lengths[k] for k in order[i : i + batch]]
        real += sum(group)
        padded += batch * max(group)
    return 1 - real / padded


def packed_padding_fraction(lengths: list[int], capacity: int, batch: int, seed: int = 0) -> float:
    from chatkit.data import pack_best_fit

    rows = [sum(lengths[i] for i in r) for r in pack_best_fit(lengths, capacity)]
    return padding_fraction(rows, batch, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat of the data (default: 5)")
    p.add_argument("--procs", type=int, default=2, help="tokenizer processes")
    p.add_argument("--max-length", type=int, default=1024)
    args = p.parse_args()
    src = SHARED / "alpaca_en_demo.json"
    if not src.is_file():
        sys.exit(f"needs {src} (the shared data beside the repository)")
    from transformers import PreTrainedTokenizerFast

    from chatkit.conversation import read_jsonl
    from chatkit.data import tokenize_file
    from chatkit.datasets import get_dataset
    from chatkit.datasets.prepare import prepare
    from chatkit.templates import get_template

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(SHARED / "20B_tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|padding|>"
    )
    template = get_template("alpaca")
    repeats = 1 if args.quick else 5
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rows = json.loads(src.read_text())
        (d / "alpaca.json").write_text(json.dumps(rows * repeats))
        t0 = time.perf_counter()
        prepare(
            get_dataset("alpaca"),
            ["--source", str(d / "alpaca.json"), "--out", str(d / "out"), "--val-fraction", "0"],
        )
        t_prepare = time.perf_counter() - t0
        train = str(d / "out" / "train.jsonl")

        t0 = time.perf_counter()
        ts = tokenize_file(
            train,
            tok,
            template,
            args.max_length,
            num_proc=args.procs,
            cache_dir=d / "cache",
            show_progress=False,
        )
        t_tokenize = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokenize_file(train, tok, template, args.max_length, cache_dir=d / "cache", show_progress=False)
        t_cached = time.perf_counter() - t0

        tok.chat_template = template.chat_template
        convs = read_jsonl(train)
        t0 = time.perf_counter()
        for c in convs:
            tok.apply_chat_template([m.to_dict() for m in c.messages], tokenize=True)
        t_plain = time.perf_counter() - t0

    n_tokens = int(ts.offsets[-1])
    lengths = ts.lengths.tolist()
    result = {
        "bench": "data_throughput",
        "conversations": len(ts),
        "tokens": n_tokens,
        "tokenizer_procs": args.procs,
        "prepare_s": round(t_prepare, 3),
        "tokenize_s": round(t_tokenize, 3),
        "prepare_plus_tokenize_tokens_per_s": round(n_tokens / (t_prepare + t_tokenize)),
        "tokenize_tokens_per_s": round(n_tokens / t_tokenize),
        "plain_apply_chat_template_tokens_per_s": round(n_tokens / t_plain),
        "tokenize_over_plain": round(t_plain / t_tokenize, 2),
        "cached_load_s": round(t_cached, 4),
    }
    for b in (4, 8, 16):
        result[f"padding_fraction_batch{b}"] = round(padding_fraction(lengths, b), 3)
        result[f"packed_padding_fraction_batch{b}"] = round(
            packed_padding_fraction(lengths, args.max_length, b), 3
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
