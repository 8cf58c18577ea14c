"""Print the top-k passages of an index for a query, with their scores.

    python retrieval/search.py --index indexes/mydocs "how do I reset my password?"
    python retrieval/search.py --index data/wikipedia-3sentence-level-retrieval-index/files -k 3 --expand "Where is Zurich?"

--expand applies OpenChatKit's neighbouring-passage expansion (what the chat shell puts in the prompt).
"""

import argparse
import sys

from chatkit.retrieval.context import Retriever, describe_passages
from chatkit.retrieval.passages import RetrievalError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", nargs="+", help="the query text")
    p.add_argument(
        "--index", required=True, metavar="DIR", help="an index folder (from build_index.py or prepare.py)"
    )
    p.add_argument("-k", type=int, default=5, help="passages to return (%(default)s)")
    p.add_argument("--model", metavar="DIR", help="query encoder folder (default: the model meta.json names)")
    p.add_argument("--expand", action="store_true", help="widen each hit with similar neighbouring passages")
    p.add_argument(
        "--window", type=int, default=5, help="neighbours considered each side with --expand (%(default)s)"
    )
    p.add_argument(
        "--threshold", type=float, default=0.5, help="cosine needed to keep a neighbour (%(default)s)"
    )
    args = p.parse_args()
    try:
        retriever = Retriever.from_dir(args.index, args.model, args.window, args.threshold)
        query = " ".join(args.query)
        hits = retriever.retrieve(query, args.k) if args.expand else retriever.search(query, args.k)
    except RetrievalError as e:
        sys.exit(f"error: {e}")
    print(describe_passages(hits))


if __name__ == "__main__":
    main()
