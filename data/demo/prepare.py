"""Write the demo's synthetic chat dataset (arithmetic, word reversal, multi-turn recall).

python data/demo/prepare.py --out data/demo/files --train 20000 --heldout 100
"""

import argparse

from chatkit.conversation import write_conversations
from chatkit.datasets.synthetic import TASKS, make_splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo/files", help="output folder (train.jsonl, heldout.jsonl)")
    p.add_argument("--train", type=int, default=20000, help="training conversations")
    p.add_argument("--heldout", type=int, default=100, help="held-out conversations (never in train)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    train, heldout = make_splits(args.train, args.heldout, args.seed)
    n_train = write_conversations(f"{args.out}/train.jsonl", train)
    n_held = write_conversations(f"{args.out}/heldout.jsonl", heldout)
    print(f"tasks: {', '.join(TASKS)}")
    print(f"wrote {n_train} train and {n_held} held-out conversations to {args.out}/")


if __name__ == "__main__":
    main()
