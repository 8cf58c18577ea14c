"""Retrieval index: build time, per-query latency (p50, p95) and recall@5 against exact search, beside a
numpy brute-force baseline.

    python bench/retrieval.py            # 100,000 passages, 1,000 queries
    python bench/retrieval.py --quick    # 50,000 passages, 200 queries (under a minute on 2 cores)
    python bench/retrieval.py --text 5000  # also embed 5,000 synthetic text passages with all-MiniLM-L6-v2

The corpus is vectors, not text: 384-dimensional unit vectors (all-MiniLM-L6-v2's width) drawn around
1,000 clusters in a 48-dimensional subspace plus isotropic noise, a stand-in for sentence embeddings;
queries are fresh draws from the same distribution, not copies of stored vectors. Embedding 100,000
real passages on 2 CPU cores would take many minutes and measures the encoder, not the index; query
latency here excludes the query's embedding (reported apart, as `query_embed_ms_p50`, with real text).
The index is the one build_index.py chooses for that size (chatkit.retrieval.index.choose_index_type).
Exact search is numpy's `queries @ vectors.T` with argpartition; recall@5 = |approx top5 ∩ exact top5| / 5.
Final line: JSON. Targets: recall@5 >= 0.95, p50 <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from tqdm import tqdm

from chatkit.retrieval.index import choose_index_type, new_index


def clustered_vectors(
    n: int, d: int, rng: np.random.Generator, clusters: int = 1000, rank: int = 48
) -> np.ndarray:
    centres = np.random.default_rng(0).standard_normal((clusters, rank)).astype(np.float32)
    basis = np.random.default_rng(1).standard_normal((rank, d)).astype(np.float32)
    z = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, rank)).astype(np.float32)
    x = z @ basis + 0.3 * np.sqrt(rank) * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T  # (nq, n)
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def per_query_ms(fn, queries: np.ndarray, desc: str) -> np.ndarray:
    times = []
    for i in tqdm(range(len(queries)), desc=desc, unit="q", leave=False):
        t0 = time.perf_counter()
        fn(queries[i : i + 1])
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times)


def synthetic_texts(n: int, rng: np.random.Generator) -> list[str]:
    topics = ["river", "mountain", "city", "music", "planet", "protein", "engine", "forest", "market", "poem"]
    verbs = ["describes", "explains", "mentions", "compares", "lists"]
    things = ["history", "climate", "people", "maps", "energy", "trade", "art", "laws", "roads", "food"]
    out = []
    for _ in range(n):
        t, v, a, b = rng.choice(topics), rng.choice(verbs), rng.choice(things), rng.choice(things)
        out.append(f"This {t} passage {v} {a} and {b}. It was written in {rng.integers(1800, 2024)}. "
                   f"The {t} has {rng.integers(2, 900)} notable {b}.")  # fmt: skip
    return out


def embed_figures(n_text: int, rng: np.random.Generator) -> dict:
    """Embed synthetic text with all-MiniLM-L6-v2: passages/s, per-query embedding ms, recall on real vectors."""
    from chatkit.retrieval.embed import SentenceTransformerEncoder

    enc = SentenceTransformerEncoder()
    texts = synthetic_texts(n_text, rng)
    t0 = time.perf_counter()
    x = enc.encode(texts, progress=True)
    rate = n_text / (time.perf_counter() - t0)
    queries = synthetic_texts(50, rng)
    embed_ms = per_query_ms(lambda q: enc.encode([queries[0]]), np.zeros((50, 1)), "embed query")
    q = enc.encode(queries)
    index = new_index("hnsw", x)
    _, got = index.search(q, 5)
    exact = exact_top(x, q, 5)
    recall = float(np.mean([len(set(g) & set(e)) / 5 for g, e in zip(got, exact, strict=True)]))
    return {"text_passages": n_text, "embed_passages_per_s": round(rate, 1),
            "query_embed_ms_p50": round(float(np.median(embed_ms)), 2), "text_hnsw_recall_at_5": round(recall, 4)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="50,000 passages and 200 queries")
    p.add_argument("--passages", type=int, help="corpus size (default 100,000; 50,000 with --quick)")
    p.add_argument("--queries", type=int, help="number of queries (default 1,000; 200 with --quick)")
    p.add_argument(
        "--text", type=int, default=0, metavar="N", help="also embed N synthetic text passages with MiniLM"
    )
    args = p.parse_args()
    n = args.passages or (50_000 if args.quick else 100_000)
    nq = args.queries or (200 if args.quick else 1_000)
    d, k = 384, 5
    rng = np.random.default_rng(42)
    x, q = clustered_vectors(n, d, rng), clustered_vectors(nq, d, rng)

    kind = choose_index_type(n)
    t0 = time.perf_counter()
    index = new_index(kind, x)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = exact_top(x, q, k)
    exact_batch_s = time.perf_counter() - t0

    index.search(q[:10], k)  # warm up
    lat = per_query_ms(lambda v: index.search(v, k), q, kind)
    _, got = index.search(q, k)
    recall = float(np.mean([len(set(g) & set(e)) / k for g, e in zip(got, exact, strict=True)]))
    brute = per_query_ms(lambda v: exact_top(x, v, k), q[: min(nq, 200)], "numpy")

    result = {
        "bench": "retrieval", "corpus": "clustered random vectors", "passages": n, "dim": d, "queries": nq,
        "index_type": kind, "build_s": round(build_s, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3),
        "recall_at_5": round(recall, 4),
        "numpy_p50_ms": round(float(np.percentile(brute, 50)), 3), "numpy_p95_ms": round(float(np.percentile(brute, 95)), 3),
        "numpy_batch_all_queries_s": round(exact_batch_s, 2),
    }  # fmt: skip
    if args.text:
        result |= embed_figures(args.text, rng)
    result["targets_met"] = result["recall_at_5"] >= 0.95 and result["p50_ms"] <= 5
    print(f"{kind}: build {build_s:.1f}s, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, recall@5 {recall:.3f}; "
          f"numpy brute force p50 {result['numpy_p50_ms']} ms")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
