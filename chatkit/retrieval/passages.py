"""Documents in, passages out: reading text, Markdown, JSONL and parquet, and splitting into passages.

A passage is about three sentences, OpenChatKit's unit (its Wikipedia index holds 3-sentence
snippets). Passages are stored in order, so the neighbours of passage i are i-1 and i+1; `doc`
numbers the document a passage came from, and expansion never crosses into another document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
DOC_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")


class RetrievalError(RuntimeError):
    """Bad input or an unusable index: the message says which file and what to do."""


@dataclass(frozen=True)
class Passage:
    """One stored passage (or, after expansion, a run of neighbouring ones) and its search score."""

    id: int  # row in the passage table (for an expanded passage: the hit's row)
    text: str
    source: str = ""  # the document: a file, or file:line for JSONL, file[row] for parquet
    doc: int = -1  # document number; -1 when unknown (OpenChatKit's Wikipedia table)
    score: float | None = None
    first: int | None = None  # rows covered after expansion, first..last inclusive
    last: int | None = None

    def with_score(self, score: float) -> Passage:
        return replace(self, score=score)


@dataclass(frozen=True)
class Document:
    source: str
    text: str


# --- reading ---------------------------------------------------------------------------------------


def find_documents(paths: Sequence[str | Path]) -> list[Path]:
    """The files themselves, or the supported files under each folder, sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(DOC_SUFFIXES))
        elif p.is_file():
            found.append(p)
        else:
            raise RetrievalError(f"--docs {p}: no such file or folder")
    return found


def read_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Yield the documents of one file: the whole file for text/Markdown, one per row for JSONL/parquet."""
    name = path.name.lower()
    if name.endswith(".jsonl"):
        yield from _jsonl_documents(path, text_field)
    elif name.endswith(".parquet"):
        yield from _parquet_documents(path, text_field)
    elif name.endswith(TEXT_SUFFIXES):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RetrievalError(f"{path}: cannot read as UTF-8 text ({e})") from None
        yield Document(str(path), strip_markdown(text) if name.endswith((".md", ".markdown")) else text)
    else:
        raise RetrievalError(f"{path}: unknown format (expected one of {', '.join(DOC_SUFFIXES)})")


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetrievalError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise RetrievalError(f"{path}:{lineno}: expected an object with a string {field!r} field")
            yield Document(f"{path}:{lineno}", row[field])


def _parquet_documents(path: Path, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid for files that are not parquet
        raise RetrievalError(f"{path}: cannot read as parquet ({e})") from None
    if field not in pf.schema_arrow.names:
        raise RetrievalError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    i = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[field]):
        for text in batch.column(0).to_pylist():
            yield Document(f"{path}[{i}]", text or "")
            i += 1


_MD_LINE = re.compile(r"^\s{0,3}(#{1,6}\s+|[-*+]\s+|\d+[.)]\s+|>\s?)")
_MD_INLINE = re.compile(r"!?\[([^\]]*)\]\([^)]*\)|[*_`]{1,3}")


def strip_markdown(text: str) -> str:
    """Markdown to plain text, enough for embedding: no heading/list/quote markers, links as their text."""
    lines = []
    for line in text.splitlines():
        if line.strip().startswith("```"):
            continue
        line = _MD_LINE.sub("", line)
        line = _MD_INLINE.sub(lambda m: m.group(1) or "", line)
        # A heading or list item is a sentence of its own: end it if it has no final punctuation.
        lines.append(line if not line.strip() or line.rstrip()[-1] in ".!?:" else line.rstrip() + ".")
    return "\n".join(lines)


# --- splitting -------------------------------------------------------------------------------------

# A sentence ends at . ! ? (plus closing quotes/brackets) followed by space and an upper-case letter,
# digit or opening quote. Good enough for passages; abbreviations like "e.g. the" do not split.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str, max_words: int = 80) -> list[str]:
    """Sentences of a text; blank lines end a sentence; over-long ones are cut every `max_words` words."""
    sentences = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in _SENTENCE_END.split(para):
            words = s.split()
            for i in range(0, len(words), max_words):
                sentences.append(" ".join(words[i : i + max_words]))
    return [s for s in sentences if s]


def split_passages(text: str, sentences: int = 3) -> list[str]:
    """Consecutive groups of `sentences` sentences (the last group may be shorter)."""
    sents = split_sentences(text)
    return [" ".join(sents[i : i + sentences]) for i in range(0, len(sents), sentences)]


def passages_from(documents: Iterable[Document], sentences: int = 3, first_doc: int = 0) -> list[Passage]:
    """Split every document; passage ids are assigned later, when they join a table."""
    out = []
    for doc_no, doc in enumerate(documents, first_doc):
        out += [Passage(-1, t, doc.source, doc_no) for t in split_passages(doc.text, sentences)]
    return out


# --- the passage table (parquet, beside the index) ------------------------------------------------


class PassageTable:
    """Passages stored as a parquet table, read memory-mapped; row i is the passage of index id i."""

    def __init__(self, path: str | Path, text_column: str = "text"):
        import pyarrow.parquet as pq

        self.path = Path(path)
        if not self.path.is_file():
            raise RetrievalError(f"{self.path}: passage table not found")
        try:
            self.table = pq.read_table(self.path, memory_map=True)
        except Exception as e:
            raise RetrievalError(f"{self.path}: corrupt passage table ({e})") from None
        if text_column not in self.table.column_names:
            raise RetrievalError(
                f"{self.path}: no column {text_column!r} ({', '.join(self.table.column_names)})"
            )
        self.text = self.table.column(text_column)
        names = self.table.column_names
        self.source = self.table.column("source") if "source" in names else None
        self.doc = self.table.column("doc") if "doc" in names else None

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> Passage:
        if not 0 <= i < len(self):
            raise IndexError(i)
        source = self.source[i].as_py() if self.source is not None else ""
        doc = self.doc[i].as_py() if self.doc is not None else -1
        return Passage(i, self.text[i].as_py() or "", source or "", doc)

    def num_docs(self) -> int:
        import pyarrow.compute as pc

        return 0 if self.doc is None or len(self) == 0 else int(pc.max(self.doc).as_py()) + 1


def write_passages(path: str | Path, passages: Sequence[Passage]) -> None:
    """Write the passage table (text, source, doc) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatkit.io import atomic_open

    table = pa.table(
        {
            "text": pa.array([p.text for p in passages], pa.string()),
            "source": pa.array([p.source for p in passages], pa.string()),
            "doc": pa.array([p.doc for p in passages], pa.int64()),
        }
    )
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f)
