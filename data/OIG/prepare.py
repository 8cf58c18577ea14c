"""Prepare LAION's Open Instruction Generalist (OpenChatKit's fine-tuning data) as chatkit conversations.

    python data/OIG/prepare.py  # download from the hub, write data/OIG/files/
    python data/OIG/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format
    python data/OIG/prepare.py --files unified_chip2.jsonl  # only some of the upstream files
    python data/OIG/prepare.py --recipe config/GPT-NeoXT-Chat-Base-20B.yaml  # every folder the recipe reads

Writes train.jsonl and val.jsonl and prints rows read, conversations written and skips by reason.
The mapping is chatkit/datasets/oig.py; README.md says where the data comes from.
"""

from chatkit.datasets.oig import SPEC
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(SPEC)
