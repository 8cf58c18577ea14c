"""Chat templates: one definition each, from which both the training renderer and the exported
Hugging Face Jinja `chat_template` are generated, so training and inference cannot drift apart.

A template is a set of pieces. `{content}` marks where a message's text goes; `{eos}` and `{bos}` stand
for the tokenizer's special tokens (Jinja's `eos_token`/`bos_token`). Rendering yields *segments*,
each flagged trained or not, so labels are built per message at tokenization time instead of by
searching the rendered string for markers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from chatkit.conversation import Message

_PLACEHOLDERS = {"{eos}": "eos_token", "{bos}": "bos_token"}


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    """Registry name, stored in every exported model folder."""
    system: str = "{content}\n"
    """Whole piece for a system message."""
    user: str = "{content}\n"
    """Whole piece for a user message."""
    assistant_prefix: str = ""
    """Opens an assistant turn; also the generation prompt. Never trained."""
    assistant: str = "{content}{eos}"
    """The trained part of an assistant turn: content plus the end of turn, so the model learns to stop."""
    separator: str = ""
    """Untrained text after each assistant turn (after the stop, so the model never generates it)."""
    bos: str = ""
    """Text that opens every conversation."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a reply besides the eos token (e.g. a hallucinated next user turn)."""
    default_system: str | None = None
    """System message used when a conversation has none."""
    description: str = ""

    def _fill(self, piece: str, content: str, eos: str, bos: str) -> str:
        # replace, not str.format: message content may contain braces.
        return piece.replace("{eos}", eos).replace("{bos}", bos).replace("{content}", content)

    def _with_default_system(self, messages: Sequence[Message]) -> list[Message]:
        msgs = list(messages)
        if self.default_system is not None and (not msgs or msgs[0].role != "system"):
            msgs.insert(0, Message("system", self.default_system))
        return msgs

    def segments(
        self,
        messages: Sequence[Message],
        eos_token: str,
        bos_token: str = "",
        add_generation_prompt: bool = False,
    ) -> list[Segment]:
        """Render messages as segments; a segment is trained when its message is."""
        segs: list[Segment] = []
        if self.bos:
            segs.append(Segment(self._fill(self.bos, "", eos_token, bos_token), False))
        for m in self._with_default_system(messages):
            if m.role == "assistant":
                segs.append(Segment(self._fill(self.assistant_prefix, "", eos_token, bos_token), False))
                body = self._fill(self.assistant, m.content, eos_token, bos_token)
                segs.append(Segment(body, m.trained))
                segs.append(Segment(self._fill(self.separator, "", eos_token, bos_token), False))
            else:
                piece = self.system if m.role == "system" else self.user
                segs.append(Segment(self._fill(piece, m.content, eos_token, bos_token), m.trained))
        if add_generation_prompt:
            segs.append(Segment(self._fill(self.assistant_prefix, "", eos_token, bos_token), False))
        return [s for s in segs if s.text]

    def reply_text(self, generated: str) -> str:
        """Recover a message's content from generated text (drops the piece's literal head, e.g. a space)."""
        head = self.assistant.split("{content}", 1)[0]
        return generated[len(head) :] if head and generated.startswith(head) else generated

    def render(
        self, messages: Sequence[Message], eos_token: str, bos_token: str = "", add_generation_prompt=False
    ) -> str:
        return "".join(s.text for s in self.segments(messages, eos_token, bos_token, add_generation_prompt))

    @property
    def chat_template(self) -> str:
        """The Hugging Face Jinja template equivalent to `render` (tests check they agree)."""
        sys_expr = _jinja_piece(self.system)
        user_expr = _jinja_piece(self.user)
        # The piece's literal head (e.g. a space) goes before {% generation %}: Hugging Face maps the
        # block's first character to a token, and a space that merges into the next word has none.
        head, _, tail = self.assistant.partition("{content}")
        head_expr = _jinja_piece(head)
        body_expr = _jinja_piece("{content}" + tail)
        parts = []
        if self.bos:
            parts.append("{{- " + _jinja_piece(self.bos) + " -}}")
        if self.default_system is not None:
            default = json.dumps(self.default_system)
            parts.append(
                "{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}"
                "{{- " + sys_expr.replace("message['content']", default) + " -}}{%- endif -%}"
            )
        parts.append(
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{{- " + sys_expr + " -}}"
            "{%- elif message['role'] == 'user' -%}{{- " + user_expr + " -}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- " + _jinja_piece(self.assistant_prefix) + " -}}"
            "{{- " + head_expr + " -}}"
            "{%- generation -%}{{- " + body_expr + " -}}{%- endgeneration -%}"
            "{{- " + _jinja_piece(self.separator) + " -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + _jinja_piece(self.assistant_prefix) + " -}}{%- endif -%}"
        )
        return "".join(parts)


def _jinja_piece(piece: str) -> str:
    """A Jinja expression for a piece: literals joined with `~`, placeholders as variables."""
    exprs: list[str] = []
    rest = piece
    while rest:
        hits = [(rest.find(p), p) for p in (*_PLACEHOLDERS, "{content}") if p in rest]
        if not hits:
            exprs.append(json.dumps(rest))
            break
        pos, ph = min(hits)
        if pos:
            exprs.append(json.dumps(rest[:pos]))
        exprs.append("message['content']" if ph == "{content}" else _PLACEHOLDERS[ph])
        rest = rest[pos + len(ph) :]
    return " ~ ".join(exprs) if exprs else '""'


_REGISTRY: dict[str, ChatTemplate] = {}


def register_template(template: ChatTemplate) -> ChatTemplate:
    if template.name in _REGISTRY:
        raise ValueError(f"chat template {template.name!r} is already registered")
    _REGISTRY[template.name] = template
    return template


def get_template(name: str) -> ChatTemplate:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_templates() -> list[str]:
    return sorted(_REGISTRY)


# OpenChatKit (Together): "<human>: ...\n<bot>: ...\n". Replies end with the eos token, which is
# trained; "<human>:" stays a stop string, as OpenChatKit's bot.py used it, for base models that
# run on into a fake next turn.
register_template(
    ChatTemplate(
        name="openchatkit",
        system="{content}\n",
        user="<human>: {content}\n",
        assistant_prefix="<bot>:",
        assistant=" {content}{eos}",
        separator="\n",
        stop_strings=("<human>:",),
        description="OpenChatKit's <human>:/<bot>: format",
    )
)
