"""Prepare Together's LLaMA-2-7B-32K (Llama 2 with a 32K context), the base of OpenChatKit's 32K fine-tunes.

    python pretrained/Llama-2-7B-32K-beta/prepare.py                     # download (about 13 GB)
    python pretrained/Llama-2-7B-32K-beta/prepare.py --source ~/LLaMA-2-7B-32K  # a copy you have

Writes pretrained/Llama-2-7B-32K-beta/model (config, tokenizer with the llama2 chat template,
safetensors weights, chatkit.json), which config/llama-2-7b-32k-mqa.yaml and
config/llama-2-7b-32k-booksum.yaml train from. Custom modeling code that config.json may name
(auto_map) is left out: transformers' own Llama reads the weights and config.json's rope scaling.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("Llama-2-7B-32K-beta", description=__doc__)
