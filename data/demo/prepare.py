"""Write the demo's synthetic chat dataset (arithmetic, word reversal, multi-turn recall).

python data/demo/prepare.py --out data/demo/files --train 20000 --heldout 100
python data/demo/prepare.py --pairs 10000  # also preference pairs for `make demo-dpo`

--pairs N also writes pairs_train.jsonl (N pairs: the right answer chosen, a near miss rejected) and
pairs_heldout.jsonl (one pair per held-out conversation, whose prompts no training file holds).
"""

import argparse

from chatkit.conversation import write_conversations
from chatkit.datasets.synthetic import TASKS, make_preference_pairs, make_splits
from chatkit.io import write_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo/files", help="output folder (train.jsonl, heldout.jsonl)")
    p.add_argument("--train", type=int, default=20000, help="training conversations")
    p.add_argument("--heldout", type=int, default=100, help="held-out conversations (never in train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=0, help="also write this many training preference pairs")
    args = p.parse_args()

    train, heldout = make_splits(args.train, args.heldout, args.seed)
    n_train = write_conversations(f"{args.out}/train.jsonl", train)
    n_held = write_conversations(f"{args.out}/heldout.jsonl", heldout)
    print(f"tasks: {', '.join(TASKS)}")
    print(f"wrote {n_train} train and {n_held} held-out conversations to {args.out}/")
    if args.pairs:
        pairs, held_pairs = make_preference_pairs(args.pairs, heldout, args.seed + 1)
        n = write_jsonl(f"{args.out}/pairs_train.jsonl", (p.to_dict() for p in pairs))
        m = write_jsonl(f"{args.out}/pairs_heldout.jsonl", (p.to_dict() for p in held_pairs))
        print(
            f"wrote {n} train and {m} held-out preference pairs (chosen: the answer; rejected: a near miss)"
        )


if __name__ == "__main__":
    main()
