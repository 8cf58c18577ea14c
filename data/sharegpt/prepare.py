"""Prepare ShareGPT conversations (Vicuna's cleaned split) as chatkit conversations.

    python data/sharegpt/prepare.py  # download from the hub, write data/sharegpt/files/
    python data/sharegpt/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format

Writes train.jsonl and val.jsonl and prints rows read, conversations written and skips by reason.
The mapping is chatkit/datasets/sharegpt.py; README.md says where the data comes from.
"""

from chatkit.datasets.prepare import prepare
from chatkit.datasets.sharegpt import SPEC

if __name__ == "__main__":
    prepare(SPEC)
