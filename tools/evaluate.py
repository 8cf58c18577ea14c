"""Exact-match accuracy of a model on held-out conversations (last message = reference answer).

    python tools/evaluate.py --model outputs/demo/hf --data outputs/demo/heldout.jsonl

Prints per-source accuracy, then as its last line: held-out accuracy: 0.97 (97/100)
"""

import argparse

from chatkit.chat import ChatEngine
from chatkit.evaluate import evaluate_exact_match


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder")
    p.add_argument("--data", required=True, help="conversation JSONL; last message is the reference")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    p.add_argument("--predictions", help="write each answer and whether it matched to this JSONL")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    engine = ChatEngine.from_pretrained(args.model, device=args.device)
    res = evaluate_exact_match(engine, args.data, args.max_tokens, args.predictions)
    for source, (ok, n) in res.per_source.items():
        print(f"  {source:24s} {ok / n:.2f} ({ok}/{n})")
    print(f"held-out accuracy: {res.accuracy:.2f} ({res.correct}/{res.total})")


if __name__ == "__main__":
    main()
