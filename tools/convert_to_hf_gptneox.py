"""GPT-NeoX checkpoints (Pythia-Chat-Base-7B, GPT-NeoXT-Chat-Base-20B recipes) to Hugging Face.

    python tools/convert_to_hf_gptneox.py --checkpoint outputs/Pythia-Chat-Base-7B/checkpoints \
        --out outputs/Pythia-Chat-Base-7B/hf --fp16

OpenChatKit's converter of the same name needed the number of stages and refused one; this one reads
the per-layer files of any number of pipeline stages, ZeRO partitions or LoRA adapters alike (see
tools/convert_to_hf.py) and refuses a checkpoint that is not GPT-NeoX.
"""

from chatkit.convert.hf import convert_main
from chatkit.train.distributed import quiet_deepspeed

if __name__ == "__main__":
    quiet_deepspeed()  # DeepSpeed reads the checkpoints; its accelerator probe is not this tool's to print
    convert_main(None, "gpt_neox", __doc__)
