"""Tokenization with per-message labels.

The rendered conversation is tokenized as one string and each token is labelled by the `trained`
flags of the segments (message pieces) it overlaps, so labels are exact by construction and equal the
exported chat_template's assistant mask. Inference encodes prompts with the same function, so the
token sequence a model sees at chat time is the one it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatkit.conversation import Message
from chatkit.templates import Segment, Template, Tools

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """Same length as `input_ids`; IGNORE_INDEX where no loss is taken."""

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def special_tokens(tokenizer) -> tuple[str, str]:
    """The (eos, bos) strings a template's `{eos}`/`{bos}` stand for."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; chat templates need one to end replies")
    return tokenizer.eos_token, tokenizer.bos_token or ""


def add_template_tokens(tokenizer, template: Template) -> int:
    """Give the tokenizer the template's marker tokens (e.g. ChatML's) as special tokens if it lacks them.

    A marker split into pieces would be learnt as several tokens and could be produced in part; as one
    special token it is atomic. Returns how many were added (the model's embeddings must then grow).
    """
    missing = [t for t in template.special_tokens if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    return tokenizer.add_tokens(missing, special_tokens=True) if missing else 0


def encode_segments(tokenizer, segments: Sequence[Segment]) -> Encoded:
    """Tokenize the joined text once; a token is trained when it overlaps a trained segment.

    Encoding the whole string (not segment by segment) gives exactly the tokens that
    `apply_chat_template` and other inference stacks produce. The segment spans come from rendering,
    never from searching the text. A token that straddles a segment boundary (a reply's leading space
    merged into its first word, a reply's last character merged with the newline after it) is trained
    when any of its characters is: the rule transformers applies to a chat_template's
    `{% generation %}` region (`return_assistant_tokens_mask`), so the exported template marks exactly
    the tokens trained here. Needs a fast tokenizer (character offsets).
    """
    text = "".join(s.text for s in segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans: list[tuple[int, int]] = []  # the trained segments' character spans, in order
    pos = 0
    for seg in segments:
        if seg.trained:
            spans.append((pos, pos + len(seg.text)))
        pos += len(seg.text)
    labels, k = [], 0
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        # as transformers' assistant mask: skip spans the token starts after; overlap marks it
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        trained = k < len(spans) and end > spans[k][0]
        labels.append(tok if trained else IGNORE_INDEX)
    return Encoded(list(enc["input_ids"]), labels)


def encode_conversation(
    tokenizer, template: Template, messages: Sequence[Message], tools: Tools | None = None
) -> Encoded:
    """Token ids and labels for training on one conversation (`tools`: the functions it may call)."""
    eos, bos = special_tokens(tokenizer)
    return encode_segments(tokenizer, template.segments(messages, eos, bos, tools=tools))


def encode_prompt(
    tokenizer,
    template: Template,
    messages: Sequence[Message],
    tools: Tools | None = None,
    thinking: bool | None = None,
) -> list[int]:
    """Token ids of a chat prompt ending with the assistant's generation prompt (`thinking=False`: one
    that asks a reasoning model for no reasoning, e.g. Qwen3's empty think block)."""
    eos, bos = special_tokens(tokenizer)
    segments = template.segments(
        messages, eos, bos, add_generation_prompt=True, tools=tools, thinking=thinking
    )
    return encode_segments(tokenizer, segments).input_ids


def padding_id(tokenizer) -> int:
    """The id to pad batches with: the pad token, else eos, else 0.

    Padded positions carry no label and attend only to themselves, so the id only has to be valid;
    real Llama tokenizers have no pad token, and training must not depend on a prepare script
    having set one."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
