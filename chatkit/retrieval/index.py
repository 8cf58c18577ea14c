"""Faiss indexes over passage vectors (inner product), chosen by corpus size, and the index folder.

An index folder holds:
    index.faiss       the Faiss index (written to a temp name, then renamed)
    passages.parquet  the passages, row i = index id i (text, source, doc)
    meta.json         encoder kind and model, dim, metric, index type, count, file names

Index types (`choose_index_type`): exact inner product (`flat`) up to FLAT_MAX vectors, where one
query scans everything in a few ms; `hnsw` (a graph, recall ~0.99 at sub-ms queries) up to HNSW_MAX;
`ivf` (k-means cells, `nprobe` searched) beyond, where HNSW's graph memory starts to matter.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chatkit.retrieval.passages import PassageTable, RetrievalError

FORMAT = "chatkit-retrieval/1"
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
FLAT_MAX = 20_000  # exact search over 20k x 384 floats: ~5 ms on 2 cores (100k: ~28 ms)
HNSW_MAX = 2_000_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


@dataclass
class IndexMeta:
    """meta.json: what a reader needs to query the index with the encoder it was built with."""

    encoder: str  # "sentence-transformers" or "contriever"
    model: str  # hub name or folder of the embedding model
    dim: int
    index_type: str  # flat, hnsw, ivf, or prebuilt (OpenChatKit's)
    count: int
    metric: str = "inner_product"
    normalized: bool = True  # vectors are unit length (inner product = cosine)
    index_file: str = "index.faiss"  # relative to the folder, or absolute
    passages_file: str = "passages.parquet"
    text_column: str = "text"
    mmap: bool = False  # read the index memory-mapped (large prebuilt indexes)
    nprobe: int | None = None  # ivf: cells searched per query
    ef_search: int | None = None  # hnsw: candidate list size per query
    format: str = FORMAT


def choose_index_type(n: int) -> str:
    return "flat" if n <= FLAT_MAX else "hnsw" if n <= HNSW_MAX else "ivf"


def ivf_cells(n: int) -> int:
    """About 4 sqrt(n) cells, and at least ~39 training points per cell (Faiss's k-means minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def new_index(index_type: str, vectors: np.ndarray):
    """An inner-product index of `index_type` holding `vectors` (n, d); IVF is trained on them."""
    import faiss

    n, d = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif index_type == "ivf":
        nlist = ivf_cells(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small corpora: no warning, k-means still runs
        index.train(vectors)
        index.nprobe = max(1, min(nlist, max(16, nlist // 16)))
    else:
        raise RetrievalError(f"unknown index type {index_type!r} (expected one of {', '.join(INDEX_TYPES)})")
    add_vectors(index, vectors)
    return index


def add_vectors(index, vectors: np.ndarray, chunk: int = 10_000) -> None:
    from tqdm import tqdm

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    for i in tqdm(
        range(0, len(vectors), chunk), desc="indexing", unit="chunk", disable=len(vectors) <= chunk
    ):
        index.add(vectors[i : i + chunk])


def search_params(index) -> dict[str, int | None]:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    return {"nprobe": ivf.nprobe if ivf is not None else None, "ef_search": hnsw.efSearch if hnsw else None}


def write_index(index, path: str | Path) -> None:
    """faiss.write_index to a temp file beside `path`, then rename: never a half-written index."""
    import faiss

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_meta(folder: str | Path, meta: IndexMeta) -> None:
    from chatkit.io import write_json

    write_json(Path(folder) / "meta.json", asdict(meta))


def read_meta(folder: str | Path) -> IndexMeta:
    folder = Path(folder)
    if not folder.is_dir():
        raise RetrievalError(f"{folder}: no such index folder (build one with retrieval/build_index.py)")
    path = folder / "meta.json"
    if not path.is_file():
        raise RetrievalError(
            f"{folder}: not an index folder (no meta.json); build it with retrieval/build_index.py"
        )
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return IndexMeta(**raw)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise RetrievalError(f"{path}: corrupt index metadata ({e})") from None


def resolve(folder: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else folder / name


class RetrievalIndex:
    """A loaded index folder: the Faiss index, its passages and its meta, checked against each other."""

    def __init__(self, folder: str | Path, mmap: bool | None = None):
        import faiss

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        path = resolve(self.folder, self.meta.index_file)
        if not path.is_file():
            raise RetrievalError(
                f"{path}: index file missing (rebuild the index with retrieval/build_index.py)"
            )
        use_mmap = self.meta.mmap if mmap is None else mmap
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if use_mmap else 0
        try:
            self.index = faiss.read_index(str(path), flags)
        except RuntimeError as e:  # Faiss reports truncated or foreign files as RuntimeError
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise RetrievalError(f"{path}: corrupt or unreadable Faiss index ({first[:200]})") from None
        self.passages = PassageTable(resolve(self.folder, self.meta.passages_file), self.meta.text_column)
        self._check()
        self._apply_search_params()

    def _check(self) -> None:
        n, count = self.index.ntotal, len(self.passages)
        if self.index.d != self.meta.dim:
            raise RetrievalError(
                f"{self.folder}: meta.json says dimension {self.meta.dim}, the index holds {self.index.d}"
            )
        if n != count:
            raise RetrievalError(
                f"{self.folder}: the index holds {n} vectors but the passage table {count} rows"
            )

    def _apply_search_params(self) -> None:
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and self.meta.nprobe:
            ivf.nprobe = self.meta.nprobe
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None)
        if hnsw is not None and self.meta.ef_search:
            hnsw.efSearch = self.meta.ef_search

    def __len__(self) -> int:
        return self.index.ntotal

    def check_encoder(self, dim: int, model: str) -> None:
        if dim != self.index.d:
            raise RetrievalError(
                f"embedding model {model} gives {dim}-dimensional vectors but the index in {self.folder} holds "
                f"{self.index.d}-dimensional ones (built with {self.meta.model}); query it with that model"
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids, each (nq, k); ids are -1 where fewer than k results exist."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        self.check_encoder(queries.shape[1], "the query encoder")
        return self.index.search(queries, min(k, max(1, len(self))))
