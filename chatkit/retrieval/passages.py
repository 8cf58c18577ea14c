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
    shortened: bool = False  # cut to fit the model's context (chatkit.retrieval.context.fit_passages)

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


# --- Markdown -> text ------------------------------------------------------------------------------
#
# What the index stores is what the model is given, so the conversion removes Markdown's syntax and
# nothing else: heading markers (#, setext underlines), list and quote markers, horizontal rules, the
# delimiters of emphasis around words (*x*, **x**, _x_, ~~x~~), link and image syntax (the text or alt
# text stays), link reference definitions, HTML comments, backslash escapes and HTML entities. Code
# keeps every character: code spans stay as written, backticks included; fenced code blocks stay as
# written, fences and newlines included; indented code blocks become fenced ones. Underscores and
# asterisks inside words (zero_to_fp32, 2*3) are not emphasis and stay, and so does a dunder word
# (__init__). A paragraph's hard-wrapped lines are joined with spaces; no punctuation is added.
# Each block (heading, paragraph, list item, table row, code block) comes out as its own paragraph.

_FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})(.*)$")
_ATX = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?[ \t]*$")
_ATX_CLOSE = re.compile(r"(?:^|[ \t]+)#+$")
_SETEXT = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_ITEM = re.compile(r"^([ \t]*)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|[ \t]*$)")
_QUOTE = re.compile(r"^ {0,3}> ?")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*\S")
_TABLE_DELIM = re.compile(r"^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_INDENTED = re.compile(r"^(?: {4}|\t)")

_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_HTML_COMMENT = re.compile(r"<!--.*?-->")
_IMAGE = re.compile(r"!\[([^\]]*)\]\((?:[^()\s]|\([^()\s]*\))*(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_LINK = re.compile(r"\[([^\]]*)\]\((?:[^()\s]|\([^()\s]*\))*(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>")
_STAR = re.compile(r"(?<![\w*\\])(\*{1,3})(?![\s*])(.+?)(?<![\s*\\])\1(?![\w*])")
_UNDERSCORE = re.compile(r"(?<![\w\\])(_{1,3})(?![\s_])(.+?)(?<![\s_\\])\1(?!\w)")
_STRIKE = re.compile(r"(?<![\w~\\])~~(?![\s~])(.+?)(?<![\s~\\])~~(?![\w~])")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_HELD = re.compile("\x00(\\d+)\x00")


def _underscore(m: re.Match) -> str:
    # __init__, __version__: a dunder word is an identifier far more often than bold text.
    return m.group(0) if len(m.group(1)) == 2 and m.group(2).isidentifier() else m.group(2)


def markdown_inline(text: str) -> str:
    """One block's text without inline Markdown syntax; code spans are kept exactly as written."""
    import html

    held: list[str] = []

    def hold_text(kept: str) -> str:
        held.append(kept)
        return f"\x00{len(held) - 1}\x00"

    def hold(m: re.Match) -> str:
        return hold_text(m.group(0))

    text = _CODE_SPAN.sub(hold, text)
    text = _ESCAPE.sub(lambda m: hold_text(m.group(1)), text)  # an escaped character is literal
    text = _HTML_COMMENT.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(r"\1", text)
    for _ in range(3):  # nested emphasis: ***x***, **_x_**
        text = _STAR.sub(r"\2", _UNDERSCORE.sub(_underscore, _STRIKE.sub(r"\1", text)))
    text = html.unescape(text)
    return _HELD.sub(lambda m: held[int(m.group(1))], " ".join(text.split()))


def _unquote(line: str, depth: int | None = None) -> tuple[str, int]:
    """The line without its blockquote markers (at most `depth` of them) and how many there were."""
    n = 0
    while (depth is None or n < depth) and (m := _QUOTE.match(line)):
        line, n = line[m.end() :], n + 1
    return line, n


def _dedent(line: str, n: int) -> str:
    k = len(line) - len(line.lstrip(" "))
    return line[min(k, n) :]


def _row(line: str) -> str:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return " | ".join(cell.strip() for cell in re.split(r"(?<!\\)\|", line))


def strip_markdown(text: str) -> str:
    """Markdown to the plain text that is indexed and given to the model (see the notes above).

    Blocks are separated by a blank line: each heading, paragraph (its lines joined), list item and
    table row is one line; a code block keeps its lines between ``` fences."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[0].strip() == "---":  # YAML front matter: metadata, not text
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        if end is not None:
            lines = lines[end + 1 :]
    blocks: list[str] = []
    para: list[str] = []
    para_is_item = in_list = False
    blank_before, depth_before = True, 0

    def flush() -> None:
        nonlocal para_is_item
        if para:
            joined = " ".join(p[:-1] if p.endswith("\\") and not p.endswith("\\\\") else p for p in para)
            if inline := markdown_inline(joined):
                blocks.append(inline)
        para.clear()
        para_is_item = False

    i, n = 0, len(lines)
    while i < n:
        line, depth = _unquote(lines[i])
        if depth != depth_before:
            flush()
            in_list, depth_before = False, depth
        i += 1
        if not line.strip():
            flush()
            blank_before = True
            continue
        fence = _FENCE.match(line)
        if fence and not (fence.group(2)[0] == "`" and "`" in fence.group(3)):
            flush()
            indent, mark, info = len(fence.group(1)), fence.group(2), fence.group(3).strip()
            close = re.compile(rf"^[ \t]*{re.escape(mark[0])}{{{len(mark)},}}[ \t]*$")
            body = []
            while i < n:
                inner, _ = _unquote(lines[i], depth)
                i += 1
                if close.match(inner):
                    break
                body.append(_dedent(inner, indent))
            if any(b.strip() for b in body):
                blocks.append("\n".join([mark + info, *body, mark]))
            blank_before = False
            continue
        if line.lstrip().startswith("<!--") and not para:
            while "-->" not in line and i < n:
                line = lines[i]
                i += 1
            rest = line.split("-->", 1)[1] if "-->" in line else ""
            if rest.strip():
                para.append(rest.strip())
            continue
        if _INDENTED.match(line) and blank_before and not para and not in_list:
            code = [line]
            while i < n:
                inner, _ = _unquote(lines[i], depth)
                if inner.strip() and not _INDENTED.match(inner):
                    break
                code.append(inner)
                i += 1
            while not code[-1].strip():
                code.pop()
            body = [c[4:] if c.startswith("    ") else c[1:] if c.startswith("\t") else "" for c in code]
            blocks.append("\n".join(["```", *body, "```"]))
            blank_before = False
            continue
        blank, blank_before = blank_before, False
        if _REF_DEF.match(line) and not para:
            continue
        if heading := _ATX.match(line):
            flush()
            title = _ATX_CLOSE.sub("", heading.group(1) or "")
            if title := markdown_inline(title):
                blocks.append(title)
            in_list = False
            continue
        if para and not para_is_item and _SETEXT.match(line):  # the paragraph was a heading
            flush()
            continue
        if _RULE.match(line):
            flush()
            in_list = False
            continue
        if "|" in line and i < n and "|" in lines[i] and _TABLE_DELIM.match(_unquote(lines[i], depth)[0]):
            flush()
            blocks.append(markdown_inline(_row(line)))
            i += 1
            while i < n and (row := _unquote(lines[i], depth)[0]).strip() and "|" in row:
                blocks.append(markdown_inline(_row(row)))
                i += 1
            in_list = False
            continue
        item = _ITEM.match(line)
        # A list item interrupts a paragraph only if it has text and, when numbered, starts at 1.
        if item and (not para or (item.group(3) and (item.group(2) in "-*+" or item.group(2)[:-1] == "1"))):
            flush()
            para.append((item.group(3) or "").strip())
            para_is_item = in_list = True
            continue
        if blank:
            flush()
            if in_list and not line.startswith((" ", "\t")):
                in_list = False
        para.append(line.strip())
    flush()
    return "\n\n".join(blocks)


# --- splitting -------------------------------------------------------------------------------------

# A sentence ends at . ! ? (plus closing quotes/brackets) followed by space and an upper-case letter,
# digit or opening quote. Good enough for passages; abbreviations like "e.g. the" do not split.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,}|~{3,})(.*)$")


def _segments(text: str) -> Iterator[tuple[bool, str]]:
    """(is_code, text): fenced code blocks (fences included) apart from the prose around them."""
    lines, prose, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if not m or (m.group(1)[0] == "`" and "`" in m.group(2)):
            prose.append(lines[i])
            i += 1
            continue
        if prose:
            yield False, "\n".join(prose)
            prose = []
        mark = m.group(1)
        close = re.compile(rf"^[ \t]*{re.escape(mark[0])}{{{len(mark)},}}[ \t]*$")
        block, i = [lines[i]], i + 1
        while i < len(lines):
            block.append(lines[i])
            i += 1
            if close.match(block[-1]):
                break
        else:
            block.append(mark)  # unclosed: the block runs to the end, closed here
        yield True, "\n".join(block)
    if prose:
        yield False, "\n".join(prose)


def _cut_code(block: str, max_words: int) -> list[str]:
    """A fenced block, or pieces of it at line boundaries of at most `max_words` words, each fenced."""
    lines = block.split("\n")
    if len(block.split()) <= max_words:
        return [block]
    opening, body, closing = lines[0].strip(), lines[1:-1], lines[-1].strip()
    pieces: list[list[str]] = [[]]
    words = 0
    for line in body:
        n = len(line.split())
        if pieces[-1] and words + n > max_words:
            pieces.append([])
            words = 0
        pieces[-1].append(line)
        words += n
    return ["\n".join([opening, *piece, closing]) for piece in pieces if any(x.strip() for x in piece)]


def split_units(text: str, max_words: int = 80) -> list[tuple[str, int]]:
    """(unit, paragraph number): the sentences of the prose and the code blocks, in order.

    Blank lines separate paragraphs and a paragraph's lines are joined with spaces; a sentence longer
    than `max_words` words is cut every `max_words` words. A fenced code block is one unit, kept
    exactly (newlines, indentation, fences), or, when longer than `max_words` words, several units cut
    at line boundaries, each fenced again."""
    units: list[tuple[str, int]] = []
    para = 0
    for is_code, segment in _segments(text):
        if is_code:
            para += 1
            units += [(piece, para) for piece in _cut_code(segment, max_words)]
            continue
        for block in re.split(r"\n\s*\n", segment):
            block = " ".join(block.split())
            if not block:
                continue
            para += 1
            for s in _SENTENCE_END.split(block):
                words = s.split()
                units += [(" ".join(words[i : i + max_words]), para) for i in range(0, len(words), max_words)]
    return [(u, p) for u, p in units if u]


def split_sentences(text: str, max_words: int = 80) -> list[str]:
    """The units of `split_units`: sentences, and code blocks kept whole."""
    return [u for u, _ in split_units(text, max_words)]


def split_passages(text: str, sentences: int = 3) -> list[str]:
    """Consecutive groups of `sentences` units (the last group may be shorter). Within a group, units
    of one paragraph are joined by a space and a new paragraph (or a code block) starts a new line."""
    units = split_units(text)
    out = []
    for i in range(0, len(units), sentences):
        group = units[i : i + sentences]
        text = group[0][0]
        for (unit, para), (_, before) in zip(group[1:], group, strict=False):
            text += (" " if para == before else "\n") + unit
        out.append(text)
    return out


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
