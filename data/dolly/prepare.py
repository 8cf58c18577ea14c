"""Prepare Dolly-15k, without OpenAlpaca's over-long rows as chatkit conversations.

    python data/dolly/prepare.py  # download from the hub, write data/dolly/files/
    python data/dolly/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format

Writes train.jsonl and val.jsonl and prints rows read, conversations written and skips by reason.
The mapping is chatkit/datasets/dolly.py; README.md says where the data comes from.
"""

from chatkit.datasets.dolly import SPEC
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(SPEC)
