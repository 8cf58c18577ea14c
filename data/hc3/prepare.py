"""Prepare HC3 English: one conversation per human or ChatGPT answer as chatkit conversations.

    python data/hc3/prepare.py  # download from the hub, write data/hc3/files/
    python data/hc3/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format

Writes train.jsonl and val.jsonl and prints rows read, conversations written and skips by reason.
The mapping is chatkit/datasets/hc3.py; README.md says where the data comes from.
"""

from chatkit.datasets.hc3 import SPEC
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(SPEC)
