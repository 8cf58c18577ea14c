"""Exact-match accuracy of a model on held-out conversations (last message = reference answer), or
its preference accuracy on held-out preference pairs.

    python tools/evaluate.py --model outputs/demo/hf --data outputs/demo/heldout.jsonl
    python tools/evaluate.py --model outputs/demo-dpo/hf --pairs data/demo/files/pairs_heldout.jsonl \
        --reference outputs/demo/hf [--beta 0.1]

Conversations: prints per-source accuracy, then as its last line: held-out accuracy: 0.97 (97/100)
Pairs with --reference (the model preference training started from): DPO's reward accuracy, the share
of pairs whose chosen reply gained more log-probability than the rejected one; last line:
held-out reward accuracy: 0.95 (95/100). Without --reference: the share of pairs whose chosen reply
is the more likely; last line: held-out preference accuracy: 0.80 (80/100).
"""

import argparse
import sys
from pathlib import Path

from chatkit.chat import ChatEngine, describe_load_error
from chatkit.conversation import ConversationError
from chatkit.evaluate import evaluate_exact_match, evaluate_preferences


def load_engine(path: str, device: str) -> ChatEngine:
    """The model's engine, or exit with the one line that says why it does not load."""
    try:
        return ChatEngine.from_pretrained(path, device=device)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(describe_load_error(path, e))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="conversation JSONL; last message is the reference")
    what.add_argument("--pairs", help="preference JSONL (prompt, chosen, rejected): preference accuracy")
    p.add_argument("--reference", help="with --pairs: the model preference training started from")
    p.add_argument(
        "--beta", type=float, default=0.1, help="with --reference: the reward's beta (margin only)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    p.add_argument("--predictions", help="write each answer and whether it matched to this JSONL")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.reference and not args.pairs:
        p.error("--reference needs --pairs")
    engine = load_engine(args.model, args.device)  # a bad --model path is the first thing said
    data = args.pairs or args.data
    if not Path(data).is_file():
        sys.exit(f"error: {data}: no such file")
    try:
        run(args, engine)
    except (ConversationError, ValueError) as e:  # a bad line names its file, line and field
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace, engine: ChatEngine) -> None:
    """Evaluate as the arguments say; bad data raises ConversationError (file:line: field)."""
    if args.pairs:
        reference = load_engine(args.reference, args.device) if args.reference else None
        res = evaluate_preferences(engine, args.pairs, reference, args.beta)
        kind = "reward" if reference else "preference"
        what = "reward margin" if reference else "log-probability gap"
        skipped = f", {res.skipped} pair(s) longer than the context skipped" if res.skipped else ""
        print(f"  mean {what}: {res.margin:.4f}{skipped}")
        print(f"held-out {kind} accuracy: {res.accuracy:.2f} ({res.correct}/{res.total})")
        return
    res = evaluate_exact_match(engine, args.data, args.max_tokens, args.predictions)
    for source, (ok, n) in res.per_source.items():
        print(f"  {source:24s} {ok / n:.2f} ({ok}/{n})")
    print(f"held-out accuracy: {res.accuracy:.2f} ({res.correct}/{res.total})")


if __name__ == "__main__":
    main()
