"""Prepare OpenAI summarize-from-feedback comparisons: post and chosen summary as chatkit conversations.

    python data/summarize_from_feedback/prepare.py  # download from the hub, write data/summarize_from_feedback/files/
    python data/summarize_from_feedback/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format
    python data/summarize_from_feedback/prepare.py --keep-rejected  # also the rejected answers, Koala's way
    python data/summarize_from_feedback/prepare.py --pairs  # preference records (prompt, chosen, rejected) instead

Writes train.jsonl and val.jsonl (with --pairs: preference records, see
chatkit.conversation.parse_preference) and prints rows read, lines written and skips by reason.
The mapping is chatkit/datasets/summarize_from_feedback.py; README.md says where the data comes from.
"""

from chatkit.datasets.prepare import prepare
from chatkit.datasets.summarize_from_feedback import SPEC

if __name__ == "__main__":
    prepare(SPEC)
