"""Prepare EleutherAI's Pythia-6.9B-deduped, the base of OpenChatKit's Pythia-Chat-Base-7B.

    python pretrained/Pythia-6.9B-deduped/prepare.py                        # download (about 14 GB)
    python pretrained/Pythia-6.9B-deduped/prepare.py --source ~/pythia-6.9b-deduped  # a copy you have
    python pretrained/Pythia-6.9B-deduped/prepare.py --revision step100000  # an earlier checkpoint branch

Writes pretrained/Pythia-6.9B-deduped/model (config, tokenizer with the openchatkit chat template,
safetensors weights, chatkit.json), which config/Pythia-Chat-Base-7B.yaml trains from.
"""

from chatkit.pretrained import prepare_main

if __name__ == "__main__":
    prepare_main("Pythia-6.9B-deduped", description=__doc__)
