"""Merge LoRA adapters into their base model: a plain Hugging Face folder that needs no PEFT.

    python tools/merge_lora.py --base pretrained/Llama-2-13b-chat-hf/model \
        --adapter outputs/llama2-koalpaca-qlora/checkpoints/step900 --out outputs/koalpaca-merged --bf16

--adapter is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), such as a LoRA or
QLoRA checkpoint tag of the trainer. The merge is W + alpha/r * B @ A in fp32, tensor by tensor (the
base is streamed, never loaded whole); QLoRA adapters merge into the full-precision base. The tokenizer
and chat template come from the adapter folder when it has them (a training checkpoint does), else from
the base. The output is written atomically; inputs are never changed.
"""

import argparse
import sys
from pathlib import Path

from chatkit.convert.lora import lora_merged_refs
from chatkit.convert.weights import DTYPES, WeightsError, copy_aux_files, hf_refs, write_weights
from chatkit.io import atomic_dir, check_apart

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model (Hugging Face folder)")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--fp16", dest="dtype", action="store_const", const="fp16")
    dtype.add_argument("--bf16", dest="dtype", action="store_const", const="bf16")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = p.parse_args()
    base, adapter, out = Path(args.base), Path(args.adapter), Path(args.out)
    torch_dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        check_apart(out, {"--base": base, "--adapter": adapter}, WeightsError)
        refs = lora_merged_refs(hf_refs(base), adapter)
        with atomic_dir(out) as tmp:
            write_weights(tmp, refs, args.max_shard_size, torch_dtype, progress=True)
            copy_aux_files(base, tmp, torch_dtype)
            for name in TOKENIZER_FILES:  # the training run's tokenizer and template win
                if (adapter / name).is_file():
                    (tmp / name).write_bytes((adapter / name).read_bytes())
    except (OSError, WeightsError) as e:
        sys.exit(f"error: {e}")
    print(f"merged {adapter} into {base} -> {out}")


if __name__ == "__main__":
    main()
