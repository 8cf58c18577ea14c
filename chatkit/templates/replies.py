"""Reading a generated reply back as a message: its content, its tool calls and its reasoning.

A template writes an assistant message's reasoning and tool calls in its own markup (Qwen3's `<think>`
and `<tool_call>` blocks, Llama 3.1's bare JSON call, Mistral's `[TOOL_CALLS]` list). A model generates
that markup after the generation prompt, and callers need it as fields again: the server answers with
`tool_calls` and `reasoning_content`, the shell prints a `[tool call]` line. Each template has a
`ReplyFormat` saying where its markup is; `ReplyFormat.parse` reads a whole reply, `ReplyStream` one
that arrives in pieces. Markup that does not parse (malformed JSON, a block cut off by max_tokens) stays
in the content: a model's mistake is shown to the user, never raised.

This module imports only the conversation format, so every template module can use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from chatkit.conversation import ToolCall


class Reply(NamedTuple):
    """A generated reply read back: unpacks as (content, tool_calls, reasoning)."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None
    """None when the reply has no reasoning (or an empty think block)."""


CallParser = Callable[[str], "tuple[str, tuple[ToolCall, ...]] | None"]
"""The reply's text after its reasoning -> (content, calls), or None when it holds no well-formed call
(then all of it is content)."""


@dataclass(frozen=True)
class ReplyFormat:
    """Where a template's replies keep reasoning and tool calls (the markup its renderer writes)."""

    think: tuple[str, str] | None = None
    """(open, close) around reasoning at the start of a reply, e.g. Qwen3's <think> and </think>."""
    calls: CallParser | None = None
    """Reads tool calls out of a reply; None: the template has no tool-call format."""
    call_markers: tuple[str, ...] = ()
    """Text that starts a tool call wherever it appears (a stream holds everything from it on)."""
    call_openers: tuple[str, ...] = ()
    """Text that makes a reply a tool call when the reply starts with it (Llama 3.1's bare JSON)."""

    def split_think(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, the rest). A block without its close (generation stopped inside it) is
        all reasoning; text without an open but with a close (a generation prompt that opened the
        block, as some Qwen3 releases' does) is reasoning up to the close."""
        if self.think is None:
            return None, text
        open_, close = self.think
        head = text.lstrip()
        if close in text:
            before, _, after = text.partition(close)
            reasoning = before.split(open_, 1)[1] if open_ in before else before
        elif head.startswith(open_):
            reasoning, after = head[len(open_) :], ""
        else:
            return None, text
        reasoning = reasoning.strip("\n")  # Qwen3's template writes "<think>\n" + reasoning + "\n</think>"
        return (reasoning if reasoning.strip() else None), after.lstrip("\n")

    def parse(self, text: str, tools: bool = True) -> Reply:
        """The whole reply as fields. `tools=False` (the request offered none) reads no calls.
        Content is trimmed where there is markup to read (the renderers trim it), else kept as is."""
        calls = self.calls if tools else None
        if self.think is None and calls is None:
            return Reply(text)
        reasoning, rest = self.split_think(text)
        parsed = calls(rest) if calls is not None else None
        if parsed is not None:
            return Reply(parsed[0].strip(), parsed[1], reasoning)
        return Reply(rest.strip(), (), reasoning)


PLAIN = ReplyFormat()
"""Templates without reasoning or tool calls (chatkit's named templates)."""


def _arguments(value: Any) -> dict[str, Any] | None:
    """A call's arguments as an object (a JSON string of one is read), or None when they are not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def _call(obj: Any) -> ToolCall | None:
    """One decoded call object ({"name", "arguments" or "parameters", "id"?}) as a ToolCall, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    args = _arguments(obj.get(key, {}))
    if args is None:
        return None
    call_id = obj.get("id")
    return ToolCall(obj["name"], args, call_id if isinstance(call_id, str) else None)


def _calls(objs: list[Any]) -> tuple[ToolCall, ...] | None:
    """Decoded call objects as ToolCalls; None when there are none or any is not a call."""
    calls = [_call(obj) for obj in objs]
    if not calls or None in calls:
        return None
    return tuple(c for c in calls if c is not None)


def _json_values(text: str) -> list[Any] | None:
    """The JSON values `text` holds one after another (separated by whitespace or ';', as Llama 3.1
    writes several calls), or None when any of it is not JSON."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
        i = len(text) - len(text[i:].lstrip().removeprefix(";").lstrip())
    return values


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def hermes_calls(text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
    """Qwen3's (and Hermes') calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
    blocks, any number, anywhere; the text around them is the content."""
    if "<tool_call>" not in text:
        return None
    calls, content, pos = [], [], 0
    for block in _HERMES_BLOCK.finditer(text):
        call = _call(_one_json(block.group(1)))
        if call is None:
            return None
        content.append(text[pos : block.start()])
        calls.append(call)
        pos = block.end()
    if "<tool_call>" in text[pos:]:  # a block left open: cut off, so not a call
        return None
    return "".join([*content, text[pos:]]), tuple(calls)


def _one_json(text: str) -> Any:
    values = _json_values(text.strip())
    return values[0] if values is not None and len(values) == 1 else None


PYTHON_TAG = "<|python_tag|>"


def llama3_calls(text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
    """Llama 3.1's calls: the whole reply is a JSON call `{"name": ..., "parameters": {...}}` (as its
    template renders one), perhaps after `<|python_tag|>`, perhaps several separated by ';'."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].strip()
    elif not body.startswith("{"):
        return None
    calls = _calls(_json_values(body) or [])
    return None if calls is None else ("", calls)


MISTRAL_CALLS = "[TOOL_CALLS]"


def mistral_calls(text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
    """Mistral's calls: `[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": "..."}, ...]`; text
    before the marker is the content, nothing but whitespace may follow the list."""
    before, marker, after = text.partition(MISTRAL_CALLS)
    if not marker:
        return None
    values = _json_values(after.strip())
    if values is None or len(values) != 1:
        return None
    calls = _calls(values[0] if isinstance(values[0], list) else [values[0]])
    return None if calls is None else (before, calls)


THINK = ("<think>", "</think>")
QWEN3 = ReplyFormat(think=THINK, calls=hermes_calls, call_markers=("<tool_call>",))
LLAMA3 = ReplyFormat(calls=llama3_calls, call_openers=("{", PYTHON_TAG))
MISTRAL = ReplyFormat(calls=mistral_calls, call_markers=(MISTRAL_CALLS,))


def format_of_jinja(chat_template: str) -> ReplyFormat:
    """The reply format a tokenizer's own Jinja template shows (the `hf` template): reasoning when it
    writes <think>, calls in the first of the known markups it writes; else plain."""
    think = THINK if "<think>" in chat_template else None
    for marker, fmt in (("<tool_call>", QWEN3), (MISTRAL_CALLS, MISTRAL), (PYTHON_TAG, LLAMA3)):
        if marker in chat_template:
            return ReplyFormat(think, fmt.calls, fmt.call_markers, fmt.call_openers)
    return ReplyFormat(think)


def _partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of one of `markers`."""
    hold = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                hold = max(hold, n)
                break
    return hold


class ReplyStream:
    """A reply arriving in pieces, split into reasoning and content deltas as they become certain.

    Text that is or could become a tool call (from a call marker on, a partial marker at the end, a
    whole reply that starts like a call) is held back until `finish`, which parses the whole reply; so
    the deltas of each kind join to exactly the final reply's field, and a malformed call comes out as
    content at the end instead of being lost. `tools=False` streams calls' markup as content."""

    def __init__(self, fmt: ReplyFormat, tools: bool = True) -> None:
        self.fmt = fmt
        self.tools = tools and fmt.calls is not None
        self.passthrough = fmt.think is None and not self.tools
        """Nothing to read: every piece is content as it comes (as `parse` keeps it)."""
        self.text = ""
        self.sent = {"reasoning": "", "content": ""}
        self.markers = (fmt.think or ()) + (fmt.call_markers if self.tools else ())

    def push(self, piece: str) -> list[tuple[str, str]]:
        """Add a piece of the reply; returns the new (kind, text) deltas, kind "reasoning" or "content"."""
        self.text += piece
        if self.passthrough:
            return [("content", piece)] if piece else []
        reasoning, rest = self.fmt.split_think(self._certain(self.text))
        return self._deltas(reasoning or "", rest.strip())

    def finish(self) -> tuple[list[tuple[str, str]], Reply]:
        """The deltas still held back and the whole reply, parsed."""
        reply = self.fmt.parse(self.text, self.tools)
        if self.passthrough:
            return [], reply
        return self._deltas(reply.reasoning or "", reply.content, final=True), reply

    def _certain(self, text: str) -> str:
        """The longest start of `text` that can no longer turn into a tool call or a marker."""
        end = len(text)
        if self.tools:
            for marker in self.fmt.call_markers:
                if (i := text.find(marker)) >= 0:
                    end = min(end, i)
            if self.fmt.call_openers:  # a reply that is, or may yet be, a bare call: hold all of it
                _, rest = self.fmt.split_think(text)
                head = rest.lstrip()
                if any(o.startswith(head) or head.startswith(o) for o in self.fmt.call_openers):
                    end = min(end, len(text) - len(rest))
        return text[: end - _partial_marker(text[:end], self.markers)]

    def _deltas(self, reasoning: str, content: str, final: bool = False) -> list[tuple[str, str]]:
        out = []
        for kind, text in (("reasoning", reasoning), ("content", content)):
            if not final:
                text = text.rstrip()  # trailing space may yet be trimmed away (before a call, at the end)
            sent = self.sent[kind]
            if len(text) > len(sent) and text.startswith(sent):
                out.append((kind, text[len(sent) :]))
                self.sent[kind] = text
        return out
