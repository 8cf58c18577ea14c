"""Prepare meta-llama/Llama-3.1-8B-Instruct (gated: accept Meta's Llama 3.1 licence on the model page) as a chatkit base, with its own chat template (`llama3`).

    python pretrained/Llama-3.1-8B-Instruct/prepare.py [--token hf_...]      # download (about 16 GB)
    python pretrained/Llama-3.1-8B-Instruct/prepare.py --source ~/Llama-3.1-8B-Instruct       # a copy you have

Writes pretrained/Llama-3.1-8B-Instruct/model (config, tokenizer with the `llama3` chat template, safetensors weights,
chatkit.json): `model=pretrained/Llama-3.1-8B-Instruct/model` in a recipe trains from it.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("Llama-3.1-8B-Instruct", description=__doc__)
