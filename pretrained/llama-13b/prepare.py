"""Prepare LLaMA-13B (the huggyllama/llama-13b conversion), the base of the Koala recipe.

    python pretrained/llama-13b/prepare.py                       # download (about 26 GB)
    python pretrained/llama-13b/prepare.py --source ~/llama-13b  # a copy you have (e.g. converted from Meta's)
    python pretrained/llama-13b/prepare.py --dtype bf16          # Koala trained in bf16

Writes pretrained/llama-13b/model (config, tokenizer with the koala chat template, safetensors
weights, chatkit.json), which config/koala.yaml trains from.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("llama-13b", description=__doc__)
