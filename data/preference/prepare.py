"""Prepare preference records from a local file or folder in a common public layout.

    python data/preference/prepare.py --source dpo_en_demo.json  # write data/preference/files/
    python data/preference/prepare.py --source FOLDER --files "data/train_prefs-*.parquet" --out DIR

Writes train.jsonl and val.jsonl of preference records (chatkit.conversation.parse_preference) and
prints rows read, pairs written and skips by reason. The layouts (detected per row) are in
chatkit/datasets/preference.py; README.md shows one example of each.
"""

from chatkit.datasets.preference import SPEC
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(SPEC)
