"""What every chat template is: the `Template` protocol, the `Segment` it renders to, and shared constants.

This module imports no other template module: `named` (chatkit's own templates) and `hf` (a tokenizer's
own chat_template) both build on it, and `chatkit.templates` ties them together in its registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from chatkit.conversation import Message

HF_TEMPLATE = "hf"
"""Registry name of the tokenizer's own chat template; needs a tokenizer, so it is never registered."""


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


@runtime_checkable
class Template(Protocol):
    """What callers (tokenization, chat, data caching, export) use of a chat template, named or `hf`.

    `{eos}`/`{bos}` in a template stand for the tokenizer's special tokens, passed as `eos_token` and
    `bos_token`; a rendered conversation is a list of segments, each trained or not, so labels come per
    message. `chat_template` is the Jinja equivalent of `render`, embedded in exported tokenizers.
    """

    @property
    def name(self) -> str:
        """Registry name, stored in every exported model folder and in tokenized-data cache keys."""
        ...

    @property
    def description(self) -> str:
        """One line for humans: the format and its origin."""
        ...

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings that end a reply besides the eos token (e.g. a hallucinated next user turn)."""
        ...

    @property
    def default_system(self) -> str | None:
        """System message used when a conversation has none (None: no default)."""
        ...

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Marker strings a tokenizer must hold as special tokens (one id each, never split)."""
        ...

    @property
    def chat_template(self) -> str:
        """The Hugging Face Jinja template that renders as `render` does (set on exported tokenizers)."""
        ...

    def segments(
        self,
        messages: Sequence[Message],
        eos_token: str,
        bos_token: str = "",
        add_generation_prompt: bool = False,
    ) -> list[Segment]:
        """Render messages as non-empty segments; a segment is trained when its message is."""
        ...

    def render(
        self, messages: Sequence[Message], eos_token: str, bos_token: str = "", add_generation_prompt=False
    ) -> str:
        """The joined text of `segments` (with the generation prompt, a chat prompt)."""
        ...

    def reply_text(self, generated: str) -> str:
        """Recover a message's content from the text a model generated after the generation prompt."""
        ...
