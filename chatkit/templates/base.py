"""What every chat template is: the `Template` protocol, the `Segment` it renders to, and shared constants.

This module imports no other template module but `replies` (reading generated replies back, which
imports only the conversation format): `named` (chatkit's own templates) and `hf` (a tokenizer's own
chat_template) both build on it, and `chatkit.templates` ties them together in its registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from chatkit.conversation import Message
from chatkit.templates.replies import Reply, ReplyFormat

HF_TEMPLATE = "hf"
"""Registry name of the tokenizer's own chat template; needs a tokenizer, so it is never registered."""

TOOL_TEMPLATES = ("llama3", "qwen3", "mistral")
"""Registered templates with a format for tool calls and results (named in errors that suggest one)."""

REASONING_POLICIES = ("train", "context")
"""What a template does with an assistant message's reasoning: `train` it with the reply, or keep it
in the text as `context` only (untrained)."""

Tools = Sequence[Mapping[str, Any]]
"""OpenAI function schemas (`{"type": "function", "function": {"name", "description", "parameters"}}`)."""


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
        *,
        tools: Tools | None = None,
        thinking: bool | None = None,
    ) -> list[Segment]:
        """Render messages as non-empty segments; a segment is trained when its message is.

        `tools` are the functions the assistant may call (a template without a tool format refuses them);
        `thinking=False` asks a reasoning template's generation prompt for a reply without reasoning
        (Qwen3's `enable_thinking=False`); None is the template's default."""
        ...

    def render(
        self,
        messages: Sequence[Message],
        eos_token: str,
        bos_token: str = "",
        add_generation_prompt=False,
        *,
        tools: Tools | None = None,
        thinking: bool | None = None,
    ) -> str:
        """The joined text of `segments` (with the generation prompt, a chat prompt)."""
        ...

    def reply_text(self, generated: str) -> str:
        """Recover a message's content from the text a model generated after the generation prompt."""
        ...

    @property
    def reply_format(self) -> ReplyFormat:
        """Where replies keep reasoning and tool calls, to read them back (chatkit/templates/replies.py)."""
        ...

    def parse_reply(self, generated: str, tools: bool = True) -> Reply:
        """A reply (`reply_text`'s result) as (content, tool_calls, reasoning); markup that does not parse
        stays in the content. `tools=False`: no tools were offered, so no calls are read."""
        ...


def hf_message(m: Message) -> dict[str, Any]:
    """A message as the dict Hugging Face chat templates read (OpenAI's shape; reasoning as
    `reasoning_content`, the name Qwen3's and most reasoning templates read)."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [c.to_dict() for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    if m.reasoning is not None:
        d["reasoning_content"] = m.reasoning
    return d


def refuse_tools_and_reasoning(template: str, messages: Sequence[Message], tools: Tools | None) -> None:
    """Raise, naming the template and the first message it cannot render, when a conversation has
    tools, tool calls, tool results or reasoning and the template has no format for them."""
    hint = (
        f"use a template that has one ({', '.join(TOOL_TEMPLATES)} for tools, qwen3 for reasoning), "
        f"or {HF_TEMPLATE!r} with a tokenizer whose own template has one"
    )
    if tools:
        raise ValueError(f"chat template {template!r} has no format for tool definitions; {hint}")
    for i, m in enumerate(messages):
        what = (
            "a tool result"
            if m.role == "tool"
            else "tool calls"
            if m.tool_calls
            else "reasoning"
            if m.reasoning is not None
            else None
        )
        if what:
            raise ValueError(f"chat template {template!r} has no format for {what} (messages[{i}]); {hint}")
