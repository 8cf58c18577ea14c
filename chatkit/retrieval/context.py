"""The chat side of retrieval: find passages for a user turn and format them as that turn's context.

    retriever = Retriever.from_dir("indexes/mydocs")
    passages = retriever.retrieve("Where is Zurich?", k=1)
    text = context_message(passages)   # goes into the prompt for this turn only

Neighbouring-passage expansion follows OpenChatKit (retrieval/wikipedia.py): for each hit i, embed
passages i-w..i+w and, walking outwards in each direction, prepend/append neighbour i-j (i+j) while
its cosine similarity to passage i is above `threshold`, stopping at the first that is not.
OpenChatKit's defaults are k=1, w=5, threshold 0.5. Unlike the original, neighbours are joined with a
space (it concatenated them directly), expansion stops at a document boundary and at the ends of the
table (where the original gave up on the whole expansion), and a hit already covered by an earlier
hit's expansion is skipped.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from chatkit.retrieval.embed import Encoder, load_encoder
from chatkit.retrieval.index import RetrievalIndex
from chatkit.retrieval.passages import Passage

CONTEXT_HEADER = "Use the following passages as context for the next question if they are relevant."


class Retriever:
    """An index folder plus the encoder it was built with."""

    def __init__(self, index: RetrievalIndex, encoder: Encoder, window: int = 5, threshold: float = 0.5):
        index.check_encoder(encoder.dim, encoder.name)
        self.index, self.encoder = index, encoder
        self.window, self.threshold = window, threshold

    @classmethod
    def from_dir(
        cls,
        folder: str | Path,
        model: str | None = None,
        window: int = 5,
        threshold: float = 0.5,
        device: str = "cpu",
    ) -> Retriever:
        """Load `folder`; the query encoder is the one meta.json names unless `model` (a folder) overrides it."""
        index = RetrievalIndex(folder)
        encoder = load_encoder(index.meta.encoder, model or index.meta.model, device)
        return cls(index, encoder, window, threshold)

    def search(self, query: str, k: int = 5) -> list[Passage]:
        """The top-k stored passages for `query`, best first, each with its score (inner product)."""
        q = self.encoder.encode([query])
        scores, ids = self.index.search(q, k)
        return [
            self.index.passages[int(i)].with_score(float(s))
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0
        ]

    def retrieve(self, query: str, k: int = 1, expand: bool = True) -> list[Passage]:
        """search(), then each hit widened with its similar neighbours (see the module docstring)."""
        hits = self.search(query, k)
        if not expand or self.window <= 0:
            return hits
        out: list[Passage] = []
        for hit in hits:
            if any(p.first <= hit.id <= p.last for p in out):
                continue
            out.append(self.expand(hit))
        return out

    def expand(self, hit: Passage) -> Passage:
        before = self._neighbours(hit, -1)
        after = self._neighbours(hit, +1)
        texts = [p.text for p in (*before, hit, *after)]
        vecs = self.encoder.encode(texts)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        sims = vecs @ vecs[len(before)]  # cosine of each to the hit
        first, last = hit.id, hit.id
        keep_before: list[str] = []
        for j, p in enumerate(reversed(before)):  # nearest first
            if sims[len(before) - 1 - j] <= self.threshold:
                break
            keep_before.insert(0, p.text)
            first = p.id
        keep_after: list[str] = []
        for j, p in enumerate(after):
            if sims[len(before) + 1 + j] <= self.threshold:
                break
            keep_after.append(p.text)
            last = p.id
        text = " ".join([*keep_before, hit.text, *keep_after])
        return replace(hit, text=text, first=first, last=last)

    def _neighbours(self, hit: Passage, step: int) -> list[Passage]:
        """Up to `window` passages on one side of the hit, in table order, within the hit's document."""
        table, found = self.index.passages, []
        for j in range(1, self.window + 1):
            i = hit.id + step * j
            if not 0 <= i < len(table):
                break
            p = table[i]
            if p.doc != hit.doc:
                break
            found.append(p)
        return found[::-1] if step < 0 else found


def context_message(passages: list[Passage], header: str = CONTEXT_HEADER) -> str:
    """The retrieved passages as text for the current turn ('' when there are none)."""
    if not passages:
        return ""
    lines = [header]
    for n, p in enumerate(passages, 1):
        where = f" ({p.source})" if p.source else ""
        lines.append(f"[{n}]{where} {p.text}")
    return "\n".join(lines)


def describe_passages(passages: list[Passage]) -> str:
    """What `/context` shows: each passage with its score and rows, or a note that nothing was retrieved."""
    if not passages:
        return "(no passages were retrieved for the last turn)"
    out = []
    for n, p in enumerate(passages, 1):
        rows = f"rows {p.first}-{p.last}" if p.first is not None and p.first != p.last else f"row {p.id}"
        score = f"score {p.score:.3f}, " if p.score is not None else ""
        out.append(f"[{n}] {score}{rows}{', ' + p.source if p.source else ''}\n{p.text}")
    return "\n\n".join(out)


def context_provider(retriever: Retriever, k: int = 1):
    """The chat shell's hook (`ChatShell(context_provider=...)`): passages for the newest user turn.

    Returns the passages' text; the shell puts them into that turn's prompt only (see
    `chatkit.chat.with_context`) and `/context` shows them.
    """

    def provide(messages) -> list[str]:
        query = next((m.content for m in reversed(messages) if m.role == "user"), "")
        return [p.text for p in retriever.retrieve(query, k)] if query.strip() else []

    return provide
