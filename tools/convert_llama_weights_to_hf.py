"""Convert Meta's original LLaMA / Llama-2 download (params.json, consolidated.NN.pth, tokenizer.model) to a
Hugging Face LlamaForCausalLM folder.

    python tools/convert_llama_weights_to_hf.py --input-dir llama-2-7b --out llama-2-7b-hf --llama-version 2
    python tools/convert_llama_weights_to_hf.py --input-dir llama/13B --out llama-13b-hf --llama-version 1 --fp16

All model-parallel shards (1 for 7B, 2 for 13B, 8 for 70B) are joined as Meta's code splits them and q/k
are permuted to Hugging Face's rotary layout, tensor by tensor: memory stays near one output shard.
tokenizer.model is looked for in --input-dir, then in its parent (Meta's layout), or given with --tokenizer.
The output has safetensors weights (the checkpoint's dtype unless --fp16/--bf16), config.json,
generation_config.json, a fast tokenizer giving sentencepiece's exact ids plus tokenizer.model, and
chatkit.json naming the chat template (llama2 for --llama-version 2, alpaca for 1). It is built in a
temporary folder and renamed into place when complete; the inputs are only read.
"""

from __future__ import annotations

import argparse
import sys

from chatkit.convert.meta_llama import convert_meta_llama
from chatkit.convert.weights import WeightsError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-dir", required=True, help="Meta's folder with params.json and consolidated.*.pth")
    p.add_argument("--out", required=True, help="output folder (replaced atomically when complete)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: in --input-dir or its parent)")
    p.add_argument(
        "--llama-version", type=int, choices=[1, 2], required=True,
        help="1 (LLaMA) or 2 (Llama-2): sets the context length (2048 / 4096) and chat template",
    )  # fmt: skip
    p.add_argument("--max-position-embeddings", type=int, help="override the context length")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--fp16", action="store_const", const="fp16", dest="dtype", help="write fp16 weights")
    dtype.add_argument("--bf16", action="store_const", const="bf16", dest="dtype", help="write bf16 weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest weights file written (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main() -> None:
    args = _parser().parse_args()
    try:
        r = convert_meta_llama(
            args.input_dir, args.out, args.tokenizer, args.llama_version, args.max_position_embeddings,
            args.dtype, args.max_shard_size, progress=not args.no_progress,
        )  # fmt: skip
    except (WeightsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    dtype = str(r.dtype).removeprefix("torch.")
    print(f"converted {args.input_dir} -> {r.out}: {r.tensors} tensors, {dtype}, vocab {r.vocab_size}")


if __name__ == "__main__":
    main()
