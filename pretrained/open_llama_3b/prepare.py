"""Prepare OpenLM Research's OpenLLaMA 3B, a smaller OpenLLaMA for the alpaca-style recipes.

    python pretrained/open_llama_3b/prepare.py                          # download (about 7 GB)
    python pretrained/open_llama_3b/prepare.py --source ~/open_llama_3b  # a copy you have

Writes pretrained/open_llama_3b/model (config, tokenizer with the alpaca chat template,
safetensors weights, chatkit.json). Train from it with a recipe override, e.g.
    training/finetune_openalpaca.sh model=pretrained/open_llama_3b/model
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("open_llama_3b", description=__doc__)
