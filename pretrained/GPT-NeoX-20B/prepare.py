"""Prepare EleutherAI's GPT-NeoX-20B, the base of OpenChatKit's GPT-NeoXT-Chat-Base-20B.

    python pretrained/GPT-NeoX-20B/prepare.py                    # download (about 41 GB in fp16)
    python pretrained/GPT-NeoX-20B/prepare.py --source ~/gpt-neox-20b  # a copy you have
    python pretrained/GPT-NeoX-20B/prepare.py --dtype bf16       # cast the weights while copying

Writes pretrained/GPT-NeoX-20B/model (config, tokenizer with the openchatkit chat template,
safetensors weights, chatkit.json), which config/GPT-NeoXT-Chat-Base-20B.yaml trains from.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("GPT-NeoX-20B", description=__doc__)
