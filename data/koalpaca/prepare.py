"""Prepare KoAlpaca v1.1a (Korean instructions) as chatkit conversations.

    python data/koalpaca/prepare.py  # download from the hub, write data/koalpaca/files/
    python data/koalpaca/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format

Writes train.jsonl and val.jsonl and prints rows read, conversations written and skips by reason.
The mapping is chatkit/datasets/koalpaca.py; README.md says where the data comes from.
"""

from chatkit.datasets.koalpaca import SPEC
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(SPEC)
