"""Chat templates: the registry, and the names callers import.

Every template is a `Template` (chatkit/templates/base.py): it renders a conversation as labelled
segments, as text, and as the Hugging Face Jinja `chat_template` exported with a model. There are two
kinds:

- named templates (chatkit/templates/named.py): `ChatTemplate`s defined by their pieces, each citing
  its origin; registered here under their names, and more with `register_template`;
- family templates (chatkit/templates/families.py): `llama3`, `qwen3`, `mistral`, `gemma`, today's
  formats with tool calls, tool results and reasoning, each a renderer that mirrors its published Jinja
  template (exported with `{% generation %}` marks, chatkit/templates/family_jinja.py);
- `hf` (chatkit/templates/hf.py): the base tokenizer's own `chat_template`, `get_template("hf", tokenizer)`.

Every template also reads a generated reply back (`parse_reply`: content, tool calls, reasoning) by its
`reply_format` (chatkit/templates/replies.py, which `ReplyStream` uses to split a streamed reply).

Modules import one way only: `replies` <- `base` <- `named`, `base` <- `hf`, `base` <- `families`, and
this package imports them all.
Every name importable from `chatkit.templates` before the split still is (the private `_CONTENT`,
`_PLACEHOLDERS` and `_jinja_piece` included, re-exported from `named`).
"""

from __future__ import annotations

from chatkit.conversation import Message
from chatkit.templates.base import HF_TEMPLATE, REASONING_POLICIES, Segment, Template, Tools
from chatkit.templates.families import FAMILY_TEMPLATES, FamilyTemplate
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
    "REASONING_POLICIES",
    "ChatTemplate",
    "FamilyTemplate",
    "HFChatTemplate",
    "Message",
    "Segment",
    "Template",
    "Tools",
    "alpaca_messages",
    "get_template",
    "list_templates",
    "register_template",
]

_REGISTRY: dict[str, ChatTemplate | FamilyTemplate] = {}


def register_template(template: ChatTemplate | FamilyTemplate) -> ChatTemplate | FamilyTemplate:
    if template.name == HF_TEMPLATE:
        raise ValueError(f"chat template name {HF_TEMPLATE!r} is reserved for the tokenizer's own template")
    if template.name in _REGISTRY:
        raise ValueError(f"chat template {template.name!r} is already registered")
    _REGISTRY[template.name] = template
    return template


def get_template(name: str, tokenizer=None, reasoning: str | None = None) -> Template:
    """A registered template by name; `hf` wraps `tokenizer`'s own chat_template (and needs it).

    `reasoning` (`train` or `context`, None: the template's default, `train`) is what training does with
    an assistant message's reasoning; it matters to templates that render reasoning (qwen3; `hf` has
    only `train`), and changes their labels and exported chat_template."""
    if reasoning is not None and reasoning not in REASONING_POLICIES:
        raise ValueError(
            f"reasoning policy must be one of {', '.join(REASONING_POLICIES)}, got {reasoning!r}"
        )
    if name == HF_TEMPLATE:
        if tokenizer is None:
            raise ValueError(
                "chat template 'hf' is the base tokenizer's own chat_template: pass the tokenizer"
            )
        return HFChatTemplate(tokenizer, reasoning=reasoning or "train")
    try:
        template = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(list_templates())}") from None
    if reasoning is not None and isinstance(template, FamilyTemplate):
        return template.with_reasoning(reasoning)
    return template


def list_templates() -> list[str]:
    return sorted([*_REGISTRY, HF_TEMPLATE])


for _template in (*NAMED_TEMPLATES, *FAMILY_TEMPLATES):
    register_template(_template)
del _template
