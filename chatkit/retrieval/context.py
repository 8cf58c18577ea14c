"""The chat side of retrieval: find passages for a user turn, fit them to the model's context, and
format them as that turn's context or for `/context`.

    retriever = Retriever.from_dir("indexes/mydocs")
    passages = retriever.retrieve("Where is Zurich?", k=1)
    text = context_message(passages)   # goes into the prompt for this turn only

    provider = context_provider(retriever, k=1, engine=engine, params=params)  # the chat hook
    texts = provider(messages)       # the passages that fit, for chatkit.chat.with_context
    provider.note                    # a line to print when passages were cut or left out (once)
    provider.describe()              # what /context shows: score, rows, source and text of each

Neighbouring-passage expansion follows OpenChatKit (retrieval/wikipedia.py): for each hit i, embed
passages i-w..i+w and, walking outwards in each direction, prepend/append neighbour i-j (i+j) while
its cosine similarity to passage i is above `threshold`, stopping at the first that is not.
OpenChatKit's defaults are k=1, w=5, threshold 0.5. Unlike the original, neighbours are joined with a
space (it concatenated them directly), expansion stops at a document boundary and at the ends of the
table (where the original gave up on the whole expansion), and a hit already covered by an earlier
hit's expansion is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
    """What `/context` and retrieval/search.py show: for each passage its rank, score (inner product;
    cosine for sentence-transformers indexes), passage-table rows (a range after expansion), source
    (file; file:line for JSONL, file[row] for parquet) and text, or a note that nothing was retrieved."""
    if not passages:
        return "(no passages were retrieved for the last turn)"
    out = []
    for n, p in enumerate(passages, 1):
        rows = f"rows {p.first}-{p.last}" if p.first is not None and p.first != p.last else f"row {p.id}"
        score = f"score {p.score:.3f}, " if p.score is not None else ""
        source = f", {p.source}" if p.source else ""
        cut = ", shortened to fit the context" if p.shortened else ""
        out.append(f"[{n}] {score}{rows}{source}{cut}\n{p.text}")
    return "\n\n".join(out)


# --- fitting the passages into the model's context ------------------------------------------------

MIN_WORDS = 8
"""A passage that would have to be cut shorter than this many words is left out instead."""


@dataclass(frozen=True)
class Fit:
    """What `fit_passages` kept: the passages, best first (the last one possibly shortened)."""

    passages: list[Passage]
    dropped: int = 0  # lower-ranked passages left out
    shortened: bool = False  # the last kept passage was cut
    retrieved: int = 0  # passages before fitting

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.shortened)


def _cut(p: Passage, words: list[re.Match], n: int) -> Passage:
    return replace(p, text=p.text[: words[n - 1].end()] + " …", shortened=True)


def fit_passages(
    passages: Sequence[Passage],
    prompt_tokens: Callable[[list[str]], int],
    limit: int,
    min_words: int = MIN_WORDS,
) -> Fit:
    """The best-ranked passages that fit the prompt.

    `prompt_tokens(texts)` is the length in tokens of the whole prompt with the passage texts `texts`
    added (for an engine: `engine.prompt_length(with_context(messages, texts))`); `limit` is the most
    it may be: the model's context minus the reply's max tokens. Passages are taken whole in rank
    order; the first that does not fit is cut at a word boundary (marked ` …`) to the room left if at
    least `min_words` words fit, and it and every lower-ranked one are otherwise left out. So the
    lowest-ranked passages go first. Every check measures the real prompt, so the fit is exact for
    the tokenizer and template behind `prompt_tokens`; a cut costs about log2(words) checks."""
    kept: list[Passage] = []
    texts: list[str] = []
    for p in passages:
        if prompt_tokens([*texts, p.text]) <= limit:
            kept.append(p)
            texts.append(p.text)
            continue
        words = list(re.finditer(r"\S+", p.text))
        lo, hi, best = min_words, len(words) - 1, None
        while lo <= hi:  # the longest cut that fits
            mid = (lo + hi) // 2
            cut = _cut(p, words, mid)
            if prompt_tokens([*texts, cut.text]) <= limit:
                best, lo = cut, mid + 1
            else:
                hi = mid - 1
        if best is not None:
            kept.append(best)
        break
    return Fit(kept, len(passages) - len(kept), bool(kept) and kept[-1].shortened, len(passages))


def fit_to_engine(passages: Sequence[Passage], messages: Sequence, engine: Any, max_new_tokens: int) -> Fit:
    """`fit_passages` for a `chatkit.chat.ChatEngine` (or anything with its `prompt_messages`,
    `prompt_length` and `context_length`): the passages, added to the turn's prompt with
    `chatkit.chat.with_context`, fit the context together with the conversation the engine keeps
    (it leaves out the oldest turns of a conversation that is too long by itself, never for passages)
    and `max_new_tokens` for the reply. None fits when the conversation alone fills the context."""
    from chatkit.chat import with_context

    try:
        kept = engine.prompt_messages(list(messages), max_new_tokens)
    except ValueError:  # the newest turn alone does not fit: the engine reports that when it answers
        return Fit([], len(passages), False, len(passages))
    limit = engine.context_length - max_new_tokens
    return fit_passages(passages, lambda texts: engine.prompt_length(with_context(kept, texts)), limit)


def fit_note(fit: Fit, context_length: int, max_new_tokens: int) -> str | None:
    """One line saying what fitting changed (None when nothing), naming the settings that give room."""
    if not fit.changed:
        return None
    room = f"the model's context of {context_length} tokens with --max-tokens {max_new_tokens}"
    if not fit.passages:
        return (
            f"(retrieval: no room for the retrieved passage{'s' if fit.retrieved > 1 else ''}: the conversation "
            f"and the reply fill {room}; lower --max-tokens (/set max_tokens N) or /reset the conversation)"
        )
    what = []
    if fit.dropped:
        what.append(f"{fit.dropped} of {fit.retrieved} passages left out")
    if fit.shortened:
        what.append(f"passage {len(fit.passages)} shortened")
    return (
        f"(retrieval: {' and '.join(what)} to fit {room}; /context shows what the model was given; "
        "a lower --retrieval-k or --max-tokens leaves more room per passage)"
    )


class RetrievalContext:
    """The chat hook (`ChatShell(context_provider=...)`, `ServerConfig.context_provider`): called with
    the conversation, it returns the texts of the passages retrieved for the newest user turn, which
    go into that turn's prompt only (`chatkit.chat.with_context`).

    With an `engine`, the passages are fitted to the model's context (`fit_to_engine`): the reply's
    max tokens come from the call's `max_new_tokens`, else from `params.max_new_tokens` (read at each
    call, so the bot's `/set max_tokens` counts). After each call:
      last      the passages the model was given (score, rows, source, text; cut ones marked)
      note      a line to print if fitting cut or left out passages, else None; each kind (cut, none
                fits) is noted once per provider, so a long chat is not flooded
      describe  the text `/context` shows
    One provider serves one conversation at a time (the server ignores `last` and `note`)."""

    def __init__(self, retriever: Retriever, k: int = 1, engine: Any = None, params: Any = None):
        self.retriever, self.k, self.engine, self.params = retriever, k, engine, params
        self.last: list[Passage] | None = None
        self.last_note: str | None = None
        self.note: str | None = None
        self._noted: set[bool] = set()

    def __call__(self, messages: Sequence, max_new_tokens: int | None = None) -> list[str]:
        query = next((m.content for m in reversed(messages) if m.role == "user"), "")
        hits = self.retriever.retrieve(query, self.k) if query.strip() else []
        self.note = self.last_note = None
        if hits and self.engine is not None:
            if max_new_tokens is None:
                if self.params is None:
                    raise ValueError("fitting passages to the context needs max_new_tokens (or params)")
                max_new_tokens = self.params.max_new_tokens
            fit = fit_to_engine(hits, messages, self.engine, max_new_tokens)
            hits = fit.passages
            self.last_note = fit_note(fit, self.engine.context_length, max_new_tokens)
            if self.last_note is not None and bool(fit.passages) not in self._noted:
                self._noted.add(bool(fit.passages))
                self.note = self.last_note
        self.last = hits
        return [p.text for p in hits]

    def describe(self) -> str:
        """`/context`: the last turn's passages as the model was given them, and any fitting note."""
        if self.last is None:
            return "(nothing retrieved yet)"
        text = describe_passages(self.last) if self.last or not self.last_note else ""
        return "\n".join(t for t in (text, self.last_note) if t)


def context_provider(
    retriever: Retriever, k: int = 1, engine: Any = None, params: Any = None
) -> RetrievalContext:
    """The chat hook: `RetrievalContext(retriever, k, engine, params)`; see there. Without an engine
    the passages are not fitted (the engine then refuses a prompt that does not fit)."""
    return RetrievalContext(retriever, k, engine, params)
