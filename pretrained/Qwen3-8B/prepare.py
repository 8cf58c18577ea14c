"""Prepare Qwen/Qwen3-8B (Apache-2.0, not gated) as a chatkit base, with its own chat template (`qwen3`).

    python pretrained/Qwen3-8B/prepare.py [--token hf_...]      # download (about 16 GB)
    python pretrained/Qwen3-8B/prepare.py --source ~/Qwen3-8B       # a copy you have

Writes pretrained/Qwen3-8B/model (config, tokenizer with the `qwen3` chat template, safetensors weights,
chatkit.json): `model=pretrained/Qwen3-8B/model` in a recipe trains from it.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("Qwen3-8B", description=__doc__)
