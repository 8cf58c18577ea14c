"""Prepare google/gemma-2-9b-it (gated: accept Google's Gemma terms on the model page) as a chatkit base, with its own chat template (`gemma`).

    python pretrained/gemma-2-9b-it/prepare.py [--token hf_...]      # download (about 18 GB)
    python pretrained/gemma-2-9b-it/prepare.py --source ~/gemma-2-9b-it       # a copy you have

Writes pretrained/gemma-2-9b-it/model (config, tokenizer with the `gemma` chat template, safetensors weights,
chatkit.json): `model=pretrained/gemma-2-9b-it/model` in a recipe trains from it.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("gemma-2-9b-it", description=__doc__)
