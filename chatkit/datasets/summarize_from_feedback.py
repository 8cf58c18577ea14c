"""OpenAI summarize-from-feedback comparisons: two summaries of a post, one chosen by a human.

Upstream openai/summarize_from_feedback, config `comparisons`: a loading script on the main branch,
the rows as parquet on `refs/convert/parquet` (`comparisons/train/*.parquet`, 92,858 rows; the
validation split is left out, we hold out our own val). OpenAI's own batch files
(`comparisons/batch*.json`, JSON lines) read the same; a --source folder without the parquet files is
searched for them (all of them, the batches the hub puts in its validation split too). Fields used: `info.post`, `info.title`,
`info.subreddit` (CNN/DM rows: `info.article`), `summaries[].text` and `choice` (the index of the
preferred summary). Following Koala the chosen summary is the reply. With --keep-rejected the other
summary is written too, the request ending with Koala's marker "An Unhelpful Answer:". With --pairs
each comparison is one preference record instead: the request, the chosen summary and the other.

Assumption: the user message is our own request wording around the Reddit TL;DR layout of the
paper ("SUBREDDIT: r/..., TITLE: ..., POST: ..."); Koala did not publish its prompt.
"""

from __future__ import annotations

from chatkit.datasets.spec import (
    DatasetSpec,
    RowError,
    Skip,
    field,
    preference_mappers,
    preference_pairs,
)


def request(row: dict) -> str:
    post = field(row, "info.post", optional=True)
    title = field(row, "info.title", optional=True)
    if post is not None:
        subreddit = field(row, "info.subreddit", optional=True)
        head = f"SUBREDDIT: r/{subreddit}\n" if subreddit else ""
        head += f"TITLE: {title}\n" if title else ""
        return f"Summarize this Reddit post in a few sentences.\n\n{head}POST: {post.strip()}"
    article = field(row, "info.article", optional=True)
    if article is None:
        raise Skip("no post or article")
    head = f"TITLE: {title}\n" if title else ""
    return f"Summarize this article in a few sentences.\n\n{head}ARTICLE: {article.strip()}"


def _pair(row: dict) -> tuple[str, str, str]:
    summaries = field(row, "summaries", list)
    choice = field(row, "choice", int)
    if len(summaries) != 2 or choice not in (0, 1):
        raise RowError(f"expected 2 summaries and choice 0 or 1, got {len(summaries)} and {choice}")
    texts = [field(s, "text") if isinstance(s, dict) else None for s in summaries]
    if not all(isinstance(t, str) for t in texts):
        raise RowError("field 'summaries[].text': expected str")
    return request(row), texts[choice], texts[1 - choice]


to_conversations, rejected = preference_mappers(_pair)
pairs = preference_pairs(_pair)


SPEC = DatasetSpec(
    name="summarize_from_feedback",
    repo="openai/summarize_from_feedback",
    revision="refs/convert/parquet",
    files=("comparisons/*train*.parquet",),
    other_files=("comparisons/batch*.json",),
    to_conversations=to_conversations,
    rejected=rejected,
    pairs=pairs,
    description="OpenAI summarize-from-feedback comparisons: a request to summarize the post, "
    "then the summary the labeler chose (Koala). With --pairs: the request as the prompt, the chosen "
    "summary as chosen and the other as rejected.",
)
