"""Prepare tool-calling conversations from a local file or folder in a common public layout.

    python data/toolcall/prepare.py --source glaive_toolcall_en_demo.json  # write data/toolcall/files/
    python data/toolcall/prepare.py --source FOLDER --files "*.jsonl" --out DIR

Writes train.jsonl and val.jsonl of conversations with `tools`, tool calls, tool results and
reasoning (chatkit.conversation) and prints rows read, conversations written and skips by reason.
The layouts (detected per row) are in chatkit/datasets/toolcall.py; README.md shows one of each.
"""

from chatkit.datasets.prepare import prepare
from chatkit.datasets.toolcall import SPEC

if __name__ == "__main__":
    prepare(SPEC)
