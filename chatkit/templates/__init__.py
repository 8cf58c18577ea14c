"""Chat templates: the registry, and the names callers import.

Every template is a `Template` (chatkit/templates/base.py): it renders a conversation as labelled
segments, as text, and as the Hugging Face Jinja `chat_template` exported with a model. There are two
kinds:

- named templates (chatkit/templates/named.py): `ChatTemplate`s defined by their pieces, each citing
  its origin; registered here under their names, and more with `register_template`;
- `hf` (chatkit/templates/hf.py): the base tokenizer's own `chat_template`, `get_template("hf", tokenizer)`.

Modules import one way only: `base` <- `named`, `base` <- `hf`, and this package imports all three.
Every name importable from `chatkit.templates` before the split still is (the private `_CONTENT`,
`_PLACEHOLDERS` and `_jinja_piece` included, re-exported from `named`).
"""

from __future__ import annotations

from chatkit.conversation import Message
from chatkit.templates.base import HF_TEMPLATE, Segment, Template
from chatkit.templates.hf import HFChatTemplate
from chatkit.templates.named import _CONTENT as _CONTENT
from chatkit.templates.named import _PLACEHOLDERS as _PLACEHOLDERS
from chatkit.templates.named import (
    ALPACA_INPUT_PREAMBLE,
    ALPACA_PREAMBLE,
    NAMED_TEMPLATES,
    VICUNA_SYSTEM,
    ChatTemplate,
    alpaca_messages,
)
from chatkit.templates.named import _jinja_piece as _jinja_piece

__all__ = [
    "ALPACA_INPUT_PREAMBLE",
    "ALPACA_PREAMBLE",
    "HF_TEMPLATE",
    "VICUNA_SYSTEM",
    "ChatTemplate",
    "HFChatTemplate",
    "Message",
    "Segment",
    "Template",
    "alpaca_messages",
    "get_template",
    "list_templates",
    "register_template",
]

_REGISTRY: dict[str, ChatTemplate] = {}


def register_template(template: ChatTemplate) -> ChatTemplate:
    if template.name == HF_TEMPLATE:
        raise ValueError(f"chat template name {HF_TEMPLATE!r} is reserved for the tokenizer's own template")
    if template.name in _REGISTRY:
        raise ValueError(f"chat template {template.name!r} is already registered")
    _REGISTRY[template.name] = template
    return template


def get_template(name: str, tokenizer=None) -> Template:
    """A registered template by name; `hf` wraps `tokenizer`'s own chat_template (and needs it)."""
    if name == HF_TEMPLATE:
        if tokenizer is None:
            raise ValueError(
                "chat template 'hf' is the base tokenizer's own chat_template: pass the tokenizer"
            )
        return HFChatTemplate(tokenizer)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(list_templates())}") from None


def list_templates() -> list[str]:
    return sorted([*_REGISTRY, HF_TEMPLATE])


for _template in NAMED_TEMPLATES:
    register_template(_template)
del _template
