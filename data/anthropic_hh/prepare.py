"""Prepare Anthropic HH-RLHF: the chosen transcripts as chatkit conversations.

    python data/anthropic_hh/prepare.py  # download from the hub, write data/anthropic_hh/files/
    python data/anthropic_hh/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format
    python data/anthropic_hh/prepare.py --keep-rejected  # also the rejected answers, Koala's way
    python data/anthropic_hh/prepare.py --pairs  # preference records (prompt, chosen, rejected) instead

Writes train.jsonl and val.jsonl (with --pairs: preference records, see
chatkit.conversation.parse_preference) and prints rows read, lines written and skips by reason.
The mapping is chatkit/datasets/anthropic_hh.py; README.md says where the data comes from.
"""

from chatkit.datasets.anthropic_hh import SPEC
from chatkit.datasets.prepare import prepare

if __name__ == "__main__":
    prepare(SPEC)
