"""Prepare mistralai/Mistral-7B-Instruct-v0.3 (gated: accept Mistral's conditions on the model page) as a chatkit base, with its own chat template (`mistral`).

    python pretrained/Mistral-7B-Instruct-v0.3/prepare.py [--token hf_...]      # download (about 15 GB)
    python pretrained/Mistral-7B-Instruct-v0.3/prepare.py --source ~/Mistral-7B-Instruct-v0.3       # a copy you have

Writes pretrained/Mistral-7B-Instruct-v0.3/model (config, tokenizer with the `mistral` chat template, safetensors weights,
chatkit.json): `model=pretrained/Mistral-7B-Instruct-v0.3/model` in a recipe trains from it.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("Mistral-7B-Instruct-v0.3", description=__doc__)
