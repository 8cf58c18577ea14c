"""OpenChatKit's prebuilt Wikipedia index as a chatkit index folder.

Upstream (OpenChatKit's data/wikipedia-3sentence-level-retrieval-index/prepare.py and
retrieval/wikipedia.py): the hub dataset ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index,
files `knn.index` (Faiss, inner product over facebook/contriever-msmarco mean-pooled vectors, 768
dimensions) and `wikipedia-en-sentences.parquet` (column `text_snippet`, row i = index id i). The
index is large, so it is read memory-mapped and never copied: meta.json points at the files.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatkit.retrieval.embed import CONTRIEVER_MODEL
from chatkit.retrieval.index import IndexMeta, write_meta
from chatkit.retrieval.passages import RetrievalError

REPO = "ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index"
INDEX_FILE = "knn.index"
PASSAGES_FILE = "wikipedia-en-sentences.parquet"
TEXT_COLUMN = "text_snippet"


def download(out: Path) -> Path:
    """Fetch the index and passages from the hub into `out`; returns `out`."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            REPO, repo_type="dataset", allow_patterns=[INDEX_FILE, PASSAGES_FILE], local_dir=out
        )
    except OSError as e:  # offline, unreachable: HfHubHTTPError is an OSError too
        raise RetrievalError(
            f"could not download {REPO} ({type(e).__name__}: {e}); download {INDEX_FILE} and {PASSAGES_FILE} "
            f"yourself and pass --source DIR"
        ) from None
    return out


def download_encoder() -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(CONTRIEVER_MODEL)
    except OSError as e:
        raise RetrievalError(
            f"could not download {CONTRIEVER_MODEL} ({type(e).__name__}: {e}); pass --encoder DIR (a local copy)"
        ) from None


def prepare(out: Path, source: Path | None = None, encoder: str | None = None) -> IndexMeta:
    """Check the index against its passages (and the encoder's width) and write `out`/meta.json."""
    import faiss
    import pyarrow.parquet as pq

    folder = source if source is not None else download(out)
    index_path, passages_path = (folder / INDEX_FILE).resolve(), (folder / PASSAGES_FILE).resolve()
    for path in (index_path, passages_path):
        if not path.is_file():
            raise RetrievalError(f"{path}: not found (expected {INDEX_FILE} and {PASSAGES_FILE} in {folder})")
    try:
        index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise RetrievalError(
            f"{index_path}: corrupt or unreadable Faiss index ({str(e).strip()[-200:]})"
        ) from None
    try:
        rows = pq.ParquetFile(passages_path).metadata.num_rows
    except Exception as e:
        raise RetrievalError(f"{passages_path}: cannot read as parquet ({e})") from None
    if rows != index.ntotal:
        raise RetrievalError(f"{index_path} holds {index.ntotal} vectors but {passages_path} has {rows} rows")
    model = encoder or download_encoder()
    _check_encoder_width(model, index.d)
    meta = IndexMeta(
        encoder="contriever", model=str(model), dim=index.d, index_type="prebuilt", count=index.ntotal,
        metric="inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2", normalized=False,
        index_file=str(index_path), passages_file=str(passages_path), text_column=TEXT_COLUMN, mmap=True,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, meta)
    return meta


def _check_encoder_width(model: str, dim: int) -> None:
    config = Path(model) / "config.json"
    if config.is_file():
        width = json.loads(config.read_text(encoding="utf-8")).get("hidden_size")
        if width is not None and width != dim:
            raise RetrievalError(
                f"encoder {model} gives {width}-dimensional vectors but the index holds {dim}-dimensional ones "
                f"(it was built with {CONTRIEVER_MODEL})"
            )
