"""Show conversations as the trainer sees them: every token with its id and whether it is trained."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from chatkit.conversation import iter_jsonl
from chatkit.data import fit_conversation
from chatkit.tokenization import IGNORE_INDEX

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


class InspectionError(ValueError):
    """An input tools/inspect_data.py cannot read: one line naming the flag."""


def check_data(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise InspectionError(f"--data: {path!r} is a folder, not a conversation JSONL file")
    if not p.is_file():
        raise InspectionError(f"--data: no such file {path!r}")


def load_tokenizer(model: str):
    """The tokenizer of a model folder (or of a hub id already in the Hugging Face cache: nothing is
    downloaded); InspectionError, one line, when there is none: no such folder, a folder without
    tokenizer files, one whose files do not load."""
    from transformers import AutoTokenizer

    from chatkit.pretrained import TOKENIZER_FILES

    path = Path(model)
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise InspectionError(
                f"--model: {model!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
            )
    elif path.exists():
        raise InspectionError(f"--model: {model!r} is not a folder")
    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=not path.is_dir())
    except (OSError, ValueError) as e:
        if not path.is_dir():
            raise InspectionError(
                f"--model: no such folder {model!r} (nor a hub id in the Hugging Face cache)"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InspectionError(f"--model: no tokenizer could be loaded from {model!r}: {first}") from None


def template_for(name: str, tokenizer):
    from chatkit.templates import get_template

    try:
        return get_template(name, tokenizer)
    except KeyError as e:  # an unknown name: the message lists the known ones
        raise InspectionError(f"--template: {e.args[0]}") from None


def token_table(tokenizer, ids: list[int], labels: list[int]) -> Iterator[str]:
    """One line per token: position, id, label mark, the token's text."""
    yield f"{'pos':>5} {'id':>7}  {'train':5}  token"
    for pos, (tok, label) in enumerate(zip(ids, labels, strict=True)):
        text = repr(tokenizer.decode([tok], skip_special_tokens=False))
        yield f"{pos:5d} {tok:7d}  {'  ✓  ' if label != IGNORE_INDEX else '  ·  '}  {text}"


def marked_text(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded text with trained tokens in green (or between ⟦ ⟧ without colour)."""
    out, inside = [], False
    for tok, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained != inside:
            out.append((GREEN if trained else RESET) if color else ("⟦" if trained else "⟧"))
            inside = trained
        out.append(tokenizer.decode([tok], skip_special_tokens=False))
    if inside:
        out.append(RESET if color else "⟧")
    return "".join(out)


def inspect_file(
    tokenizer,
    template,
    path: str,
    n: int,
    skip: int,
    max_length: int,
    overlong: str,
    color: bool,
    table: bool,
):
    for i, conv in enumerate(iter_jsonl(path)):
        if i < skip:
            continue
        if i >= skip + n:
            break
        enc, outcome = fit_conversation(tokenizer, template, conv.messages, max_length, overlong)
        head = f"── conversation {i + 1} ({conv.source or 'no source'})"
        if enc is None:
            yield f"{head}: {outcome.replace('_', ' ')}, not trained"
            continue
        yield f"{head}: {len(enc.input_ids)} tokens, {enc.num_trained} trained{', truncated' if outcome == 'truncated' else ''}"
        yield marked_text(tokenizer, enc.input_ids, enc.labels, color)
        if table:
            yield from token_table(tokenizer, enc.input_ids, enc.labels)
