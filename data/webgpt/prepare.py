"""Prepare OpenAI WebGPT comparisons: question and preferred answer as chatkit conversations.

    python data/webgpt/prepare.py  # download from the hub, write data/webgpt/files/
    python data/webgpt/prepare.py --source PATH --limit 1000  # a local copy in the upstream's format
    python data/webgpt/prepare.py --keep-rejected  # also the rejected answers, Koala's way
    python data/webgpt/prepare.py --pairs  # preference records (prompt, chosen, rejected) instead

Writes train.jsonl and val.jsonl (with --pairs: preference records, see
chatkit.conversation.parse_preference) and prints rows read, lines written and skips by reason.
The mapping is chatkit/datasets/webgpt.py; README.md says where the data comes from.
"""

from chatkit.datasets.prepare import prepare
from chatkit.datasets.webgpt import SPEC

if __name__ == "__main__":
    prepare(SPEC)
