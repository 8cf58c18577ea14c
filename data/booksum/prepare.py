"""Prepare BookSum chapter summaries, Llama-2-7B-32K's long-context fine-tune as chatkit conversations.

    python data/booksum/prepare.py  # download from the hub, write data/booksum/files/
    python data/booksum/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format

Writes train.jsonl and val.jsonl and prints rows read, conversations written and skips by reason.
The mapping is chatkit/datasets/long_data.py; README.md says where the data comes from.
"""

from chatkit.datasets.long_data import BOOKSUM
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(BOOKSUM)
