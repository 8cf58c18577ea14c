"""The one function every `data/<name>/prepare.py` calls: `prepare(SPEC)`.

It parses the common command line, downloads the upstream from the Hugging Face hub unless
--source names a local copy, reads its rows, maps each with the spec's function, validates every
conversation (`chatkit.conversation.parse_conversation`, so a mapping bug names its source row),
splits rows into train and val deterministically, writes `train.jsonl` and `val.jsonl`
atomically and prints the counts: rows read, conversations written, skips by reason.

With --pairs (preference sets whose spec has a `pairs` mapping; the only output of a spec without
`to_conversations`) the same happens to preference records instead: each is validated with
`chatkit.conversation.parse_preference`, and the files hold records, not conversations.

Nothing is dropped silently: a row a mapping cannot use is a counted skip with its reason (and
the first place it happened); a row that breaks the upstream's own format stops the run with
its file, line or index, and field. A run that would leave train.jsonl empty (an empty input, every
row skipped, e.g. a file in another dataset's format) fails, naming why, and writes nothing. An
empty val.jsonl (no row fell in the held-out share, or every one that did was skipped) is written, so
a stale one cannot linger, with a warning on stderr; `--val-fraction 0` asks for none, quietly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import yaml
from tqdm import tqdm

from chatkit.conversation import (
    ROLES,
    Conversation,
    ConversationError,
    Message,
    Preference,
    parse_conversation,
    parse_preference,
)
from chatkit.datasets.sources import DatasetError, download, find_files, iter_rows
from chatkit.datasets.spec import DatasetSpec, Messages, RowError, Skip
from chatkit.io import atomic_open

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    out: Path
    """Folder that receives train.jsonl and val.jsonl."""
    source: Path | None = None
    """Local copy of the upstream (a file or a folder); None downloads from the hub."""
    val_fraction: float = 0.01
    """Share of rows whose conversations go to val.jsonl."""
    seed: int = 0
    """Changes which rows are held out."""
    limit: int | None = None
    """Stop after this many rows (quick runs)."""
    keep_rejected: bool = False
    """Preference sets: also write the rejected answer under Koala's unhelpful marker."""
    pairs: bool = False
    """Preference sets: write preference records (`spec.pairs`) instead of conversations."""
    files: tuple[str, ...] | None = None
    """Globs of upstream files to download or read from a --source folder (default: the spec's)."""


@dataclass
class Counts:
    rows: int = 0
    train: int = 0
    val: int = 0
    val_rows: int = 0
    """Rows that fell in the held-out share, whether or not anything of them was kept."""
    skipped: Counter[str] = field(default_factory=Counter)
    first_skip: dict[str, str] = field(default_factory=dict)
    """Where each skip reason was first seen."""
    unit: str = "conversations"
    """What a written line is ("conversations" or "pairs"), for the summary and the errors."""

    @property
    def written(self) -> int:
        return self.train + self.val

    def add(self, other: Counts) -> None:
        """Fold another run's counts into these (a --recipe's total)."""
        self.rows += other.rows
        self.train += other.train
        self.val += other.val
        self.val_rows += other.val_rows
        self.skipped.update(other.skipped)
        for reason, where in other.first_skip.items():
            self.first_skip.setdefault(reason, where)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_skip.setdefault(reason, where)

    def summary(self) -> str:
        skips = ", ".join(f"{reason} ({n})" for reason, n in self.skipped.most_common())
        line = f"read {self.rows} rows, wrote {self.train} train + {self.val} val {self.unit}"
        return f"{line}, skipped {self.skipped.total()}" + (f": {skips}" if skips else "")


def problem(messages: Messages) -> str | None:
    """Why a mapped conversation cannot be trained on, or None."""
    if not messages:
        return "no messages"
    if any(m.is_empty for m in messages):  # a reply of tool calls alone has no text, and is not empty
        return "empty message"
    if not any(m.role == "user" for m in messages):
        return "no user message"
    if messages[-1].role != "assistant":
        return "does not end with an assistant message"
    return None


def pair_problem(pair: Preference) -> str | None:
    """Why a mapped preference record cannot be trained on, or None; upstream data has such rows.

    Roles outside the schema are left to validation, which names them as the mapping bug they are.
    """
    messages = (*pair.prompt, pair.chosen, pair.rejected)
    if any(m.role not in ROLES for m in messages):
        return None
    if not pair.prompt:
        return "no messages"
    if any(not m.content.strip() for m in pair.prompt):
        return "empty message"
    if not any(m.role == "user" for m in pair.prompt):
        return "no user message"
    if pair.prompt[-1].role != "user":
        return "prompt does not end with a user message"
    if not pair.chosen.content.strip():
        return "empty chosen reply"
    if not pair.rejected.content.strip():
        return "empty rejected reply"
    if pair.chosen.content.strip() == pair.rejected.content.strip():
        return "rejected reply identical to the chosen one"  # nothing for a preference loss to learn
    return None


def in_val(seed: int, file_name: str, index: int, fraction: float) -> bool:
    """Deterministic per-row split, independent of --limit and of the other rows.

    Keyed on the row (not the conversation) so that the conversations of one row, e.g. the answers
    to one HC3 question or an HH chosen/rejected pair, land on the same side.
    """
    digest = hashlib.blake2b(f"{seed}\0{file_name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64 < fraction


def _validated(
    messages: Messages, source: str, where: str, tools: tuple[dict[str, Any], ...] = ()
) -> dict[str, Any]:
    if not all(isinstance(m, Message) for m in messages):
        raise ConversationError(f"{where}: the mapping must return lists of Message")
    obj: dict[str, Any] = {"messages": [m.to_dict() for m in messages], "source": source}
    if tools:
        obj["tools"] = list(tools)
    parse_conversation(obj, where)  # a mapping bug (bad role, misplaced system message) stops here
    return obj


def _unpack(mapped: Messages | Conversation) -> tuple[Messages, tuple[dict[str, Any], ...]]:
    """A mapping's conversation as (messages, tools): a tool-use set returns `Conversation`s, which
    carry the functions the assistant may call."""
    if isinstance(mapped, Conversation):
        return list(mapped.messages), mapped.tools
    return mapped, ()


def _check_pair_types(pair: Any, where: str) -> None:
    """A mapping bug in the Python types, named before anything reads the record."""
    if not isinstance(pair, Preference) or not all(
        isinstance(m, Message) for m in (*pair.prompt, pair.chosen, pair.rejected)
    ):
        raise ConversationError(f"{where}: the pairs mapping must return lists of Preference (of Message)")


def _validated_pair(pair: Preference, source: str, where: str) -> dict[str, Any]:
    obj = {**pair.to_dict(), "source": pair.source or source}
    parse_preference(obj, where)  # a mapping bug (bad role, a reply that is not the assistant's) stops here
    return obj


def _call(spec: DatasetSpec, mapper: Any, row: Any, where: str) -> list[Any]:
    """`mapper(row)`, with a broken row named by `where` (Skip passes through to be counted)."""
    try:
        return list(mapper(row))
    except Skip:
        raise
    except RowError as e:
        raise DatasetError(f"{where}: {e}") from None
    except Exception as e:  # a row the mapping cannot read at all: name it instead of a traceback
        raise DatasetError(
            f"{where}: cannot map this row ({type(e).__name__}: {e}); is it in {spec.name}'s upstream format?"
        ) from e


def _map_row(spec: DatasetSpec, row: Any, where: str, keep_rejected: bool, counts: Counts):
    """Yield the row's valid conversations as dicts; count the skips."""
    try:
        mapped = [(spec.name, "", m) for m in _call(spec, spec.to_conversations, row, where)]
        if keep_rejected and spec.rejected is not None:
            try:
                rejected = _call(spec, spec.rejected, row, where)
                mapped += [(f"{spec.name}/rejected", "rejected: ", m) for m in rejected]
            except Skip as s:
                counts.skip(f"rejected: {s.reason}", where)
    except Skip as s:
        counts.skip(s.reason, where)
        return
    for source, prefix, conversation in mapped:
        messages, tools = _unpack(conversation)
        obj = _validated(messages, source, where, tools) if messages else None
        reason = problem(messages)
        if reason:
            counts.skip(prefix + reason, where)
        else:
            yield obj


def _map_pairs(spec: DatasetSpec, row: Any, where: str, counts: Counts):
    """Yield the row's valid preference records as dicts; count the skips."""
    try:
        pairs = _call(spec, spec.pairs, row, where)
    except Skip as s:
        counts.skip(s.reason, where)
        return
    for pair in pairs:
        _check_pair_types(pair, where)
        reason = pair_problem(pair)
        if reason:
            counts.skip(reason, where)
        else:
            yield _validated_pair(pair, spec.name, where)


def _write(f: IO[str], obj: dict[str, Any]) -> None:
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def source_files(spec: DatasetSpec, opts: Options) -> list[Path]:
    patterns = opts.files or spec.files
    if opts.source is not None:  # a folder may hold the upstream in another of its formats
        other_names = () if opts.files else spec.other_files
        return find_files(opts.source, patterns, fallback=True, other_names=other_names)
    if spec.repo is None:
        raise DatasetError(
            f"{spec.name} has no upstream to download: pass --source PATH (a file or a folder)"
        )
    logger.info("downloading %s (%s) from the Hugging Face hub", spec.repo, ", ".join(patterns))
    return find_files(download(spec, patterns), patterns)


class NothingKept(DatasetError):
    """A run that leaves train.jsonl empty; nothing is written, so earlier outputs stay as they were."""

    def __init__(self, message: str, counts: Counts):
        super().__init__(message)
        self.counts = counts


def _nothing_kept(spec: DatasetSpec, opts: Options, files: list[Path], counts: Counts) -> str:
    """Why train.jsonl would be empty, in one line naming the input and the skips."""
    src = str(files[0]) if len(files) == 1 else f"{opts.source or spec.repo} ({len(files)} files)"
    if counts.rows == 0:
        return f"{src}: wrote nothing: no rows to read (empty input)"
    if counts.written == 0:
        reasons = "; ".join(
            f"{reason}: {n}, first at {counts.first_skip[reason]}"
            for reason, n in counts.skipped.most_common()
        )
        rows = "the only row read was" if counts.rows == 1 else f"all {counts.rows} rows read were"
        return (
            f"{src}: wrote nothing: {rows} skipped ({reasons or f'no {counts.unit} in them'}); "
            f"is it in {spec.name}'s upstream format? (data/{spec.name}/README.md)"
        )
    return (
        f"{src}: wrote nothing: all {counts.val} {counts.unit} kept fell in the held-out split "
        f"(--val-fraction {opts.val_fraction}); lower it or read more rows"
    )


def _fill(
    spec: DatasetSpec,
    opts: Options,
    files: list[Path],
    counts: Counts,
    train: IO[str],
    val: IO[str],
    stack: ExitStack,
) -> None:
    for path in files:
        rows = stack.enter_context(closing(iter_rows(path)))  # closes the file when --limit stops early
        for index, (where, row) in enumerate(tqdm(rows, desc=path.name, unit=" rows", disable=None)):
            if opts.limit is not None and counts.rows >= opts.limit:
                return
            counts.rows += 1
            held_out = in_val(opts.seed, path.name, index, opts.val_fraction)
            counts.val_rows += held_out
            if opts.pairs:
                mapped = _map_pairs(spec, row, where, counts)
            else:
                mapped = _map_row(spec, row, where, opts.keep_rejected, counts)
            for obj in mapped:
                _write(val if held_out else train, obj)
                counts.val += held_out
                counts.train += not held_out


def run(spec: DatasetSpec, opts: Options) -> Counts:
    """Read, map, validate, split and write; returns the counts.

    Raises DatasetError on bad input, and NothingKept (a DatasetError) when no conversation (or
    record, with `opts.pairs`) would go to train.jsonl: an empty input, every row skipped (most often
    a file in another format), or all of them held out. Either way nothing is written and earlier
    outputs stay."""
    if opts.pairs and spec.pairs is None:
        raise DatasetError(f"{spec.name} has no preference records to write (no pairs mapping)")
    if not opts.pairs and spec.to_conversations is None:
        raise DatasetError(f"{spec.name} writes preference records only: run it with Options(pairs=True)")
    if opts.pairs and opts.keep_rejected:
        raise DatasetError("--pairs and --keep-rejected do not combine: a record holds both replies already")
    files = source_files(spec, opts)
    counts = Counts(unit="pairs" if opts.pairs else "conversations")
    made = not opts.out.exists()
    try:
        with ExitStack() as stack:
            train = stack.enter_context(atomic_open(opts.out / "train.jsonl"))
            val = stack.enter_context(atomic_open(opts.out / "val.jsonl"))
            _fill(spec, opts, files, counts, train, val, stack)
            if counts.train == 0:  # raised inside the block, so neither file replaces what was there
                raise NothingKept(_nothing_kept(spec, opts, files, counts), counts)
    except BaseException:
        if made:  # leave no empty output folder behind either
            with suppress(OSError):
                opts.out.rmdir()
        raise
    return counts


def empty_val_warning(opts: Options, counts: Counts) -> str | None:
    """A held-out share was asked for but nothing was kept in it: val.jsonl is written empty."""
    if counts.val or not opts.val_fraction:  # --val-fraction 0 asks for no held-out share: quiet
        return None
    share = f"held-out {opts.val_fraction:g} share"
    if counts.val_rows == 0:
        why = f"none of the {counts.rows} rows fell in the {share}"
    elif counts.val_rows == 1:
        why = f"the 1 of the {counts.rows} rows that fell in the {share} was skipped"
    else:
        why = f"the {counts.val_rows} of the {counts.rows} rows that fell in the {share} were all skipped"
    return f"warning: {opts.out / 'val.jsonl'} is empty: {why}; leave it out of val_files, or raise --val-fraction"


# --- command line ---------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


PAIRS_HELP = (
    "write preference records instead of conversations: the prompt messages (ending with a user "
    "message), the chosen and the rejected reply (see chatkit.conversation.parse_preference)"
)


def _upstream(spec: DatasetSpec) -> str:
    if spec.repo is None:
        return "upstream: none to download; --source names a local file or folder"
    revision = f" at revision {spec.revision}" if spec.revision else ""
    return f"upstream: https://huggingface.co/datasets/{spec.repo}{revision}"


def _epilog(spec: DatasetSpec) -> str:
    script = f"data/{spec.name}/prepare.py"
    lines = ["examples:"]
    if spec.repo is not None:
        lines.append(f"  python {script}  # download, write data/{spec.name}/files/")
    lines.append(f"  python {script} --source PATH --limit 100  # a local copy, quick look")
    if spec.pairs is not None and spec.to_conversations is not None:
        lines.append(f"  python {script} --pairs  # preference records (prompt, chosen, rejected)")
    if spec.recipe_folders is not None:
        lines.append(f"  python {script} --recipe config/RECIPE.yaml  # every folder a recipe reads")
    return "\n".join(lines)


def _output_options(p: argparse.ArgumentParser, spec: DatasetSpec) -> None:
    """--keep-rejected and --pairs, where the spec has them; they exclude each other."""
    if spec.rejected is None and spec.pairs is None:
        return  # argparse (3.11) cannot print the usage of an empty group
    group = p.add_mutually_exclusive_group()
    if spec.rejected is not None:
        group.add_argument(
            "--keep-rejected",
            action="store_true",
            help="also write each rejected answer as a conversation whose last user message ends with "
            "Koala's marker 'An Unhelpful Answer:'",
        )
    if spec.pairs is not None and spec.to_conversations is not None:
        group.add_argument("--pairs", action="store_true", help=PAIRS_HELP)
    elif spec.pairs is not None:  # accepted, so one command line serves every preference set
        group.add_argument("--pairs", action="store_true", help="preference records: the only output here")


def build_parser(spec: DatasetSpec) -> argparse.ArgumentParser:
    description = textwrap.fill(spec.description, 100)
    if spec.to_conversations is None:
        description += "\n\nwrites preference records only (prompt, chosen, rejected; see parse_preference)"
    description += f"\n\n{_upstream(spec)}\nfiles: {', '.join(spec.files)}"
    script = f"data/{spec.name}/prepare.py"
    p = argparse.ArgumentParser(
        prog=script,
        description=description,
        epilog=_epilog(spec),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        type=Path,
        metavar="PATH",
        required=spec.repo is None,
        help="local copy of the upstream: a file, or a folder searched with --files (when they match "
        "nothing there, for the same names in the other formats read here)"
        + (" (required: there is no upstream to download)" if spec.repo is None else ""),
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"output folder (data/{spec.name}/files"
        + (f"; with --pairs data/{spec.name}/files/pairs, beside the conversations)" if _both(spec) else ")"),
    )
    p.add_argument(
        "--files", nargs="+", metavar="GLOB", help="upstream files to download or read (default: above)"
    )
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        metavar="F",
        default=spec.val_fraction,
        help="share of rows for val.jsonl (%(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, metavar="N", help="changes which rows are held out (%(default)s)"
    )
    p.add_argument("--limit", type=_positive, metavar="N", help="stop after N rows")
    if spec.recipe_folders is not None:
        p.add_argument(
            "--recipe",
            type=Path,
            metavar="YAML",
            help=f"prepare every data/{spec.name}/files/<folder> the recipe's train_files and val_files "
            "read, each where the recipe reads it (one run a folder; not with --out or --files)",
        )
    _output_options(p, spec)
    return p


def _both(spec: DatasetSpec) -> bool:
    """A set that writes conversations by default and preference records with --pairs."""
    return spec.pairs is not None and spec.to_conversations is not None


def _parse(spec: DatasetSpec, argv: Sequence[str] | None) -> tuple[Options, Path | None]:
    """The run's options and the --recipe to expand them over (None: one run)."""
    p = build_parser(spec)
    args = p.parse_args(argv)
    recipe = getattr(args, "recipe", None)
    if recipe is not None and (args.out is not None or args.files):
        p.error("--recipe writes each folder where the recipe reads it, from the files its name says: "
                "leave out --out and --files")  # fmt: skip
    out = args.out or Path("data") / spec.name / "files"
    if args.out is None and getattr(args, "pairs", False) and _both(spec):
        out = out / "pairs"  # never over the conversations a plain run writes
    opts = Options(
        out=out,
        source=args.source,
        val_fraction=args.val_fraction,
        seed=args.seed,
        limit=args.limit,
        keep_rejected=getattr(args, "keep_rejected", False),
        pairs=getattr(args, "pairs", False) or spec.to_conversations is None,
        files=tuple(args.files) if args.files else None,
    )
    return opts, recipe


def parse_args(spec: DatasetSpec, argv: Sequence[str] | None = None) -> Options:
    return _parse(spec, argv)[0]


# --- --recipe: every folder of a set that a recipe reads ----------------------------------------------


def _recipe_entries(recipe: Path) -> list[str]:
    """The paths of a recipe's train_files and val_files, weights (`path:0.5`) dropped, in order."""
    if not recipe.is_file():
        raise DatasetError(f"--recipe {recipe}: no such file")
    try:
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(f"--recipe {recipe}: not a YAML recipe ({e})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"--recipe {recipe}: a recipe is a YAML mapping")
    entries = []
    for key in ("train_files", "val_files"):
        value = raw.get(key) or []
        entries += [_without_weight(str(item)) for item in ([value] if isinstance(value, str) else value)]
    return list(dict.fromkeys(entries))


def _without_weight(entry: str) -> str:
    """`file.jsonl:0.5` -> `file.jsonl` (a number after the last colon is a weight, as training reads it)."""
    path, sep, tail = entry.rpartition(":")
    if not sep:
        return entry
    try:
        float(tail)
    except ValueError:
        return entry
    return path


def recipe_runs(spec: DatasetSpec, recipe: Path, opts: Options) -> tuple[list[Options], list[str]]:
    """One run a folder for every `data/<name>/files/<folder>/{train,val}.jsonl` the recipe reads (its
    out is that folder, its files what `spec.recipe_folders` says the folder holds; `.../files/train.jsonl`
    is a run of the spec's own files), and the recipe's other entries, which this set does not write.
    The other options carry over from `opts`."""
    if spec.recipe_folders is None:
        raise DatasetError(f"{spec.name} has no --recipe: prepare it with --files and --out")
    runs: dict[Path, Options] = {}
    others = []
    for entry in _recipe_entries(recipe):
        path = Path(entry)
        parts = path.parent.parts
        if path.name not in ("train.jsonl", "val.jsonl"):
            others.append(entry)
        elif parts[-2:] == (spec.name, "files"):  # the set's default folder: its own files
            runs.setdefault(path.parent, replace(opts, out=path.parent, files=None))
        elif parts[-3:-1] == (spec.name, "files"):
            folder = path.parent
            files = spec.recipe_folders(folder.name)
            if not files:
                raise DatasetError(
                    f"{recipe}: cannot tell which upstream files {folder.as_posix()} holds (name the folder "
                    f"after one); prepare it with data/{spec.name}/prepare.py --files GLOB --out {folder}"
                )
            runs.setdefault(folder, replace(opts, out=folder, files=tuple(files)))
        else:
            others.append(entry)
    if not runs:
        raise DatasetError(f"{recipe} reads no data/{spec.name}/files/ folder")
    return list(runs.values()), others


def _report(opts: Options, counts: Counts) -> None:
    """What one run prints after writing: first skips, the files, a warning, the summary line."""
    for reason, where in counts.first_skip.items():
        print(f"{reason}: first skipped at {where}")
    print(f"wrote {opts.out / 'train.jsonl'} and {opts.out / 'val.jsonl'}")
    if warning := empty_val_warning(opts, counts):
        print(warning, file=sys.stderr)
    print(counts.summary())


def _run_or_exit(spec: DatasetSpec, opts: Options, done: str = "") -> Counts:
    try:
        return run(spec, opts)
    except (DatasetError, ConversationError) as e:
        sys.exit(f"error: {e}{done}")
    except OSError as e:  # the output folder cannot be made or written
        sys.exit(f"error: cannot write {opts.out}: {e}{done}")


def _prepare_recipe(spec: DatasetSpec, recipe: Path, opts: Options) -> Counts:
    if opts.source is not None and opts.source.is_file():
        sys.exit(
            f"error: --recipe reads one folder's files after another: --source {opts.source} must be a folder"
        )
    try:
        runs, others = recipe_runs(spec, recipe, opts)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    if others:
        print(f"{recipe} also reads {len(others)} file(s) not written here: {', '.join(others)}")
    total = Counts()
    for i, run_opts in enumerate(runs):
        files = ", ".join(run_opts.files or spec.files)
        print(f"[{i + 1}/{len(runs)}] {files} -> {run_opts.out}")
        done = f" ({i} of {len(runs)} folders for {recipe} prepared before this one)" if i else ""
        counts = _run_or_exit(spec, run_opts, done)
        _report(run_opts, counts)
        total.add(counts)
    print(f"prepared {len(runs)} folders for {recipe}: {total.summary()}")
    return total


def prepare(spec: DatasetSpec, argv: Sequence[str] | None = None) -> Counts:
    """The command line of a dataset's prepare.py; prints the counts, exits with a message on bad input.

    With --recipe, one run for each folder of the set the recipe reads; returns their counts together."""
    opts, recipe = _parse(spec, argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if recipe is not None:
        return _prepare_recipe(spec, recipe, opts)
    counts = _run_or_exit(spec, opts)
    _report(opts, counts)
    return counts
