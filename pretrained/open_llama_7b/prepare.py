"""Prepare OpenLM Research's OpenLLaMA 7B, the base of the OpenAlpaca recipe.

    python pretrained/open_llama_7b/prepare.py                          # download (about 13 GB)
    python pretrained/open_llama_7b/prepare.py --source ~/open_llama_7b  # a copy you have
    python pretrained/open_llama_7b/prepare.py --dtype fp16             # cast the weights while copying

Writes pretrained/open_llama_7b/model (config, tokenizer with the alpaca chat template,
safetensors weights, chatkit.json), which config/openalpaca.yaml trains from.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("open_llama_7b", description=__doc__)
