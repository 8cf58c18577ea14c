"""Prepare Meta's Llama-2-13b-chat-hf, the base of the llama2-koalpaca-qlora recipe.

The repository is gated: accept Meta's licence on https://huggingface.co/meta-llama/Llama-2-13b-chat-hf
with your Hugging Face account, then give a token (--token, HF_TOKEN or `hf auth login`).

    python pretrained/Llama-2-13b-chat-hf/prepare.py --token hf_...      # download (about 26 GB)
    python pretrained/Llama-2-13b-chat-hf/prepare.py --source ~/Llama-2-13b-chat-hf  # a copy you have

Writes pretrained/Llama-2-13b-chat-hf/model (config, tokenizer with the llama2 chat template,
safetensors weights, chatkit.json), which config/llama2-koalpaca-qlora.yaml trains from.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("Llama-2-13b-chat-hf", description=__doc__)
