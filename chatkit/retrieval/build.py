"""Documents -> index folder: read, split, embed, index, store (retrieval/build_index.py runs this)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from chatkit.retrieval.embed import Encoder, load_encoder
from chatkit.retrieval.index import (
    IndexMeta,
    RetrievalIndex,
    add_vectors,
    choose_index_type,
    new_index,
    read_meta,
    search_params,
    write_index,
    write_meta,
)
from chatkit.retrieval.passages import (
    Passage,
    RetrievalError,
    find_documents,
    passages_from,
    read_documents,
    write_passages,
)

log = logging.getLogger(__name__)


def collect_passages(
    docs: Sequence[str | Path], text_field: str = "text", sentences: int = 3, first_doc: int = 0
) -> list[Passage]:
    from tqdm import tqdm

    files = find_documents(docs)
    if not files:
        raise RetrievalError(
            f"no documents found in {', '.join(map(str, docs))} (.txt, .md, .jsonl, .parquet)"
        )
    passages: list[Passage] = []
    for f in tqdm(files, desc="reading", unit="file", disable=len(files) < 2):
        next_doc = max((p.doc for p in passages), default=first_doc - 1) + 1
        passages += passages_from(read_documents(f, text_field), sentences, next_doc)
    if not passages:
        raise RetrievalError(
            f"empty corpus: {len(files)} file(s) read from {', '.join(map(str, docs))}, no text in them"
        )
    return passages


def build_index(
    docs: Sequence[str | Path],
    out: str | Path,
    *,
    encoder: Encoder | None = None,
    encoder_kind: str = "sentence-transformers",
    model: str | None = None,
    index_type: str = "auto",
    add: bool = False,
    text_field: str = "text",
    sentences: int = 3,
    batch_size: int = 64,
    progress: bool = True,
) -> IndexMeta:
    """Build `out` from `docs` (or, with add=True, append them to the index already there)."""
    from chatkit.io import atomic_dir

    out = Path(out)
    old = RetrievalIndex(out, mmap=False) if add else None
    if old is not None and old.meta.index_type == "prebuilt":
        raise RetrievalError(f"{out}: a prebuilt index cannot be extended here; build your own with --docs")
    first_doc = old.passages.num_docs() if old else 0
    new = collect_passages(docs, text_field, sentences, first_doc)
    if encoder is None:
        kind, name = (old.meta.encoder, model or old.meta.model) if old else (encoder_kind, model)
        encoder = load_encoder(kind, name)
    if old is not None:
        old.check_encoder(encoder.dim, encoder.name)
    t0 = time.perf_counter()
    vectors = encoder.encode(  # a bar only when there is more than one batch to wait for
        [p.text for p in new], batch_size=batch_size, progress=progress and len(new) > batch_size
    )
    log.info("embedded %d passages in %.1fs", len(new), time.perf_counter() - t0)
    if old is None:
        kind = choose_index_type(len(new)) if index_type == "auto" else index_type
        index, passages = new_index(kind, vectors), new
    else:
        index, kind = old.index, old.meta.index_type
        add_vectors(index, vectors)
        passages = [old.passages[i] for i in range(len(old.passages))] + new
    meta = IndexMeta(
        encoder=encoder.kind, model=encoder.name, dim=encoder.dim, index_type=kind, count=index.ntotal,
        normalized=encoder.normalized, **search_params(index),
    )  # fmt: skip
    with atomic_dir(out) as tmp:  # the old folder is replaced only once the new one is complete
        write_index(index, tmp / meta.index_file)
        write_passages(tmp / meta.passages_file, passages)
        write_meta(tmp, meta)
    return meta


def describe(folder: str | Path) -> str:
    meta = read_meta(folder)
    return f"{folder}: {meta.count:,} passages, {meta.index_type} index, {meta.encoder} {meta.model} (dim {meta.dim})"
