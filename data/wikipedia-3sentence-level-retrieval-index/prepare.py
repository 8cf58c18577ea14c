"""OpenChatKit's prebuilt Wikipedia retrieval index (about 7 GB), ready for retrieval/search.py and chat.

    python data/wikipedia-3sentence-level-retrieval-index/prepare.py                  # hub download
    python data/wikipedia-3sentence-level-retrieval-index/prepare.py --source DIR --encoder CONTRIEVER_DIR

Writes files/meta.json (or --out DIR): the index and passages are read in place, memory-mapped.
The mapping is chatkit/retrieval/wikipedia.py; README.md says where the data comes from.
"""

import argparse
import sys
from pathlib import Path

from chatkit.retrieval.passages import RetrievalError
from chatkit.retrieval.wikipedia import INDEX_FILE, PASSAGES_FILE, prepare

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "files", help="index folder to write (%(default)s)")
    p.add_argument("--source", type=Path, help=f"a local folder holding {INDEX_FILE} and {PASSAGES_FILE}")
    p.add_argument("--encoder", help="local facebook/contriever-msmarco folder (default: download it)")
    args = p.parse_args()
    try:
        meta = prepare(args.out, args.source, args.encoder)
    except RetrievalError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out / 'meta.json'}: {meta.count:,} passages, dim {meta.dim}, encoder {meta.model}")
