"""Convert a DeepSpeed training checkpoint (any architecture) to a Hugging Face folder.

    python tools/convert_to_hf.py --checkpoint outputs/demo/checkpoints --out outputs/demo/hf

--checkpoint takes the checkpoints folder (its `latest` tag is used) or one tag folder (…/step900):
ZeRO partitions, pipeline stages (any number) or a LoRA/QLoRA run (adapters merged into the base).
The output has sharded safetensors weights (written tensor by tensor, never the whole model in
memory), config.json, the tokenizer with the training chat template embedded, and
generation_config.json with the tokenizer's eos. tools/convert_to_hf_gptneox.py and
tools/convert_to_hf_llama.py are the same tool that also checks the architecture.
"""

from chatkit.convert.hf import convert_main
from chatkit.train.distributed import quiet_deepspeed

if __name__ == "__main__":
    quiet_deepspeed()  # DeepSpeed reads the checkpoints; its accelerator probe is not this tool's to print
    convert_main(None, None, __doc__)
