"""Build a tiny base model (GPT-NeoX, Llama, Mistral, Qwen3 or Gemma 2) with a tokenizer trained locally: nothing is downloaded.

    python pretrained/tiny/prepare.py --corpus data/demo/files/train.jsonl --out pretrained/tiny/model
    python pretrained/tiny/prepare.py --arch llama --corpus data/demo/files/train.jsonl --out pretrained/tiny-llama/model
    python pretrained/tiny/prepare.py --arch qwen3     # also mistral, gemma2: pretrained/tiny-<family>/model

The corpus is conversation JSONL or plain text files; without --corpus the demo's synthetic tasks
are used. The weights are random (seeded): the model learns everything during fine-tuning.
"""

import argparse

from chatkit.architectures import ARCHITECTURES
from chatkit.pretrained import prepare_tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="*", default=[], help="JSONL conversations or .txt files")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--layers", type=int, help="override the registry's number of layers")
    p.add_argument("--hidden", type=int, help="override the hidden size")
    p.add_argument("--heads", type=int, help="override the number of attention heads")
    p.add_argument("--template", help="chat template the model will use (default: the family's tiny entry's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        default="gpt_neox",
        help="architecture (the tokenizer is trained the same way for each)",
    )
    p.add_argument("--out", help="output Hugging Face folder (default: pretrained/tiny[-llama]/model)")
    args = p.parse_args()
    out = args.out or f"pretrained/{ARCHITECTURES[args.arch].tiny}/model"
    n = prepare_tiny(
        args.corpus,
        out,
        args.vocab_size,
        args.template,
        args.seed,
        args.layers,
        args.hidden,
        args.heads,
        args.arch,
    )
    print(f"wrote tiny {args.arch} base ({n:,} parameters) to {out}")


if __name__ == "__main__":
    main()
