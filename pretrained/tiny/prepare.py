"""Build the tiny GPT-NeoX base model with a tokenizer trained locally: nothing is downloaded.

    python pretrained/tiny/prepare.py --corpus data/demo/files/train.jsonl --out pretrained/tiny/model

The corpus is conversation JSONL or plain text files; without --corpus the demo's synthetic tasks
are used. The weights are random (seeded): the model learns everything during fine-tuning.
"""

import argparse

from chatkit.pretrained import prepare_tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="*", default=[], help="JSONL conversations or .txt files")
    p.add_argument("--out", default="pretrained/tiny/model", help="output Hugging Face folder")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--layers", type=int, help="override the registry's number of layers")
    p.add_argument("--hidden", type=int, help="override the hidden size")
    p.add_argument("--heads", type=int, help="override the number of attention heads")
    p.add_argument("--template", default="openchatkit", help="chat template the model will use")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n = prepare_tiny(
        args.corpus, args.out, args.vocab_size, args.template, args.seed, args.layers, args.hidden, args.heads
    )
    print(f"wrote tiny GPT-NeoX base ({n:,} parameters) to {args.out}")


if __name__ == "__main__":
    main()
