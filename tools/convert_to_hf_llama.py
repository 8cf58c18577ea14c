"""Llama checkpoints (llama-2-7b-32k, openalpaca, koala, llama2-koalpaca-qlora recipes) to Hugging Face.

    python tools/convert_to_hf_llama.py --checkpoint outputs/openalpaca/checkpoints --out outputs/openalpaca/hf --bf16

ZeRO-3 partitions are merged in fp32 as DeepSpeed's zero_to_fp32 does (no separate step, as OpenAlpaca
needed), QLoRA adapters are merged into the full-precision base (--base if it moved); pipeline stages
too. Same tool as tools/convert_to_hf.py, refusing a checkpoint that is not Llama.
"""

from chatkit.convert.hf import convert_main
from chatkit.train.distributed import quiet_deepspeed

if __name__ == "__main__":
    quiet_deepspeed()  # DeepSpeed reads the checkpoints; its accelerator probe is not this tool's to print
    convert_main(None, "llama", __doc__)
