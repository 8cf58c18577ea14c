"""Prepare Stanford Alpaca's 52K instructions as chatkit conversations.

    python data/alpaca/prepare.py  # download from the hub, write data/alpaca/files/
    python data/alpaca/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format

Writes train.jsonl and val.jsonl and prints rows read, conversations written and skips by reason.
The mapping is chatkit/datasets/alpaca.py; README.md says where the data comes from.
"""

from chatkit.datasets.alpaca import SPEC
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(SPEC)
