"""Convert a DeepSpeed training checkpoint to a Hugging Face folder.

    python tools/convert_to_hf.py --checkpoint outputs/demo/checkpoints --out outputs/demo/hf

--checkpoint takes the checkpoints folder (its `latest` tag is used) or one tag folder (…/step900).
The output has safetensors weights, config.json, the tokenizer with the training chat template
embedded, and generation_config.json with the tokenizer's eos.
"""

import argparse

from chatkit.export import export_hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoints folder or one tag folder")
    p.add_argument("--out", required=True, help="output folder (replaced atomically when complete)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype")
    p.add_argument("--template", help="chat template to embed (default: the one training used)")
    args = p.parse_args()
    out = export_hf(args.checkpoint, args.out, args.dtype, args.template)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
