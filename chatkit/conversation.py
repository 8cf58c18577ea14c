"""The conversation format every dataset is turned into, and its validation.

One conversation per JSONL line::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "train": true|false}],
     "source": "..."}

`train` is optional; by default only assistant messages are trained.

Tool use and reasoning, in OpenAI's shapes (only templates with a format for them render these:
llama3, qwen3, mistral, or `hf` with a tokenizer whose template has one)::

    {"messages": [...,
       {"role": "assistant", "content": "", "reasoning": "...",
        "tool_calls": [{"type": "function", "id": "call_1",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
       {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22"}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
                                                 "parameters": {...}}}]}

A tool call's `arguments` may be a JSON string (as OpenAI's API returns them); it is read into an
object. `reasoning_content` is accepted for `reasoning`. A tool result is never trained; a reply's tool
calls are trained with it; its reasoning as the template's `reasoning` policy says.

A preference record (DPO and its relatives) is a conversation prefix ending with a user message and
two candidate replies to it, the preferred one and the other::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., {"role": "user", ...}],
     "chosen": {"role": "assistant", "content": "..."},
     "rejected": {"role": "assistant", "content": "..."},
     "source": "..."}

Only the replies are scored (their tokens and the end of turn), so the prefix carries no `train`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chatkit.io import write_jsonl

ROLES = ("system", "user", "assistant", "tool")


class ConversationError(ValueError):
    """A conversation that breaks the schema; the message names file, line and field."""


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant message (OpenAI's `tool_calls` entry)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    """The call's arguments as an object (a JSON string on input is read into one)."""
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape, the one chat templates read (`tool_call.function.name`, `.arguments`)."""
        d: dict[str, Any] = {"type": "function"}
        if self.id is not None:
            d["id"] = self.id
        d["function"] = {"name": self.name, "arguments": self.arguments}
        return d


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool | None = None
    """Overrides the default (loss on assistant messages only) when set."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls an assistant message makes; trained with the reply (its text may then be empty)."""
    tool_call_id: str | None = None
    """A tool result's answer to which call (some templates render or require it)."""
    name: str | None = None
    """A tool result's function name."""
    reasoning: str | None = None
    """An assistant message's reasoning (`reasoning_content` on input), rendered where the template has a
    place for it; trained or not as the template's `reasoning` policy says."""

    @property
    def trained(self) -> bool:
        return self.train if self.train is not None else self.role == "assistant"

    @property
    def is_empty(self) -> bool:
        """No text and no tool call: almost always a conversion bug upstream (data drops these)."""
        return not self.content.strip() and not self.tool_calls

    @property
    def uses_tools_or_reasoning(self) -> bool:
        """Whether only a template with a tool or reasoning format can render this message."""
        return self.role == "tool" or bool(self.tool_calls) or self.reasoning is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.train is not None:
            d["train"] = self.train
        if self.reasoning is not None:
            d["reasoning"] = self.reasoning
        if self.tool_calls:
            d["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    tools: tuple[dict[str, Any], ...] = ()
    """The functions the assistant may call (OpenAI function schemas); rendered by the template."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"messages": [m.to_dict() for m in self.messages], "source": self.source}
        if self.tools:
            d["tools"] = list(self.tools)
        return {**d, **self.extra}


_MESSAGE_FIELDS = {
    "system": {"role", "content", "train"},
    "user": {"role", "content", "train"},
    "assistant": {"role", "content", "train", "tool_calls", "reasoning", "reasoning_content"},
    "tool": {"role", "content", "train", "tool_call_id", "name"},
}


def _optional_str(m: dict, key: str, at: str) -> str | None:
    value = m.get(key)
    if value is not None and not isinstance(value, str):
        raise ConversationError(f"{at}.{key}: must be a string, got {type(value).__name__}")
    return value


def _parse_arguments(args: Any, at: str) -> dict[str, Any]:
    """A call's arguments as an object; a string (OpenAI's API returns them so) must hold JSON."""
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ConversationError(f"{at}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(args, dict):
        raise ConversationError(
            f"{at}: must be an object (or a JSON string of one), got {type(args).__name__}"
        )
    return args


def _parse_tool_call(c: Any, at: str) -> ToolCall:
    if not isinstance(c, dict):
        raise ConversationError(f"{at}: expected an object, got {type(c).__name__}")
    unknown = set(c) - {"type", "id", "function"}
    if unknown:
        raise ConversationError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
    if c.get("type", "function") != "function":
        raise ConversationError(f"{at}.type: only 'function' calls are supported, got {c.get('type')!r}")
    fn = c.get("function")
    if not isinstance(fn, dict):
        raise ConversationError(f"{at}.function: must be an object with 'name' and 'arguments'")
    unknown = set(fn) - {"name", "arguments"}
    if unknown:
        raise ConversationError(f"{at}.function: unknown field(s) {', '.join(sorted(unknown))}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ConversationError(f"{at}.function.name: must be a non-empty string, got {name!r}")
    args = _parse_arguments(fn.get("arguments", {}), f"{at}.function.arguments")
    return ToolCall(name, args, _optional_str(c, "id", at))


def _parse_message(m: Any, at: str) -> Message:
    if not isinstance(m, dict):
        raise ConversationError(f"{at}: expected an object, got {type(m).__name__}")
    role, content, train = m.get("role"), m.get("content"), m.get("train")
    if role not in ROLES:
        raise ConversationError(f"{at}.role: must be one of {', '.join(ROLES)}, got {role!r}")
    unknown = set(m) - _MESSAGE_FIELDS[role]
    if unknown:
        raise ConversationError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise ConversationError(f"{at}.tool_calls: must be a list, got {type(calls).__name__}")
    tool_calls = tuple(_parse_tool_call(c, f"{at}.tool_calls[{j}]") for j, c in enumerate(calls or []))
    if content is None and tool_calls:
        content = ""  # OpenAI's API sends null content with tool calls
    if not isinstance(content, str):
        raise ConversationError(f"{at}.content: must be a string, got {type(content).__name__}")
    if train is not None and not isinstance(train, bool):
        raise ConversationError(f"{at}.train: must be true or false, got {train!r}")
    if role == "tool" and train:
        raise ConversationError(f"{at}.train: a tool result is never trained (the model does not write it)")
    reasoning = _optional_str(m, "reasoning", at)
    alias = _optional_str(m, "reasoning_content", at)
    if reasoning is not None and alias is not None and alias != reasoning:
        raise ConversationError(f"{at}: 'reasoning' and 'reasoning_content' differ; give one of them")
    return Message(
        role,
        content,
        train,
        tool_calls=tool_calls,
        tool_call_id=_optional_str(m, "tool_call_id", at),
        name=_optional_str(m, "name", at),
        reasoning=reasoning if reasoning is not None else alias,
    )


def _parse_tools(tools: Any, where: str) -> tuple[dict[str, Any], ...]:
    """OpenAI function schemas, kept as given (templates render them as JSON)."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ConversationError(f"{where}: field 'tools' must be a list of function schemas")
    for k, t in enumerate(tools):
        at = f"{where}: tools[{k}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ConversationError(f'{at}: expected {{"type": "function", "function": {{"name": ...}}}}')
        name = t["function"].get("name")
        if not isinstance(name, str) or not name:
            raise ConversationError(f"{at}.function.name: must be a non-empty string, got {name!r}")
        params = t["function"].get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ConversationError(f"{at}.function.parameters: must be an object (a JSON schema)")
    return tuple(tools)


def parse_conversation(obj: Any, where: str = "<input>", preference: bool = False) -> Conversation:
    """Validate one decoded JSON object; `where` (e.g. ``train.jsonl:12``) prefixes every error."""
    if not isinstance(obj, dict):
        raise ConversationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    msgs = obj.get("messages")
    if "chosen" in obj and "rejected" in obj and not preference:
        raise ConversationError(
            f"{where}: a preference record (fields 'chosen' and 'rejected'), not a conversation: "
            "train preference pairs with method=dpo"
        )
    if not isinstance(msgs, list) or not msgs:
        raise ConversationError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        message = _parse_message(m, f"{where}: messages[{i}]")
        if message.role == "system" and i != 0:
            raise ConversationError(f"{where}: messages[{i}].role: a system message may only come first")
        out.append(message)
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise ConversationError(f"{where}: field 'source' must be a string")
    tools = _parse_tools(obj.get("tools"), where)
    extra = {k: v for k, v in obj.items() if k not in ("messages", "source", "tools")}
    return Conversation(tuple(out), source, extra, tools)


@dataclass(frozen=True)
class Preference:
    """A prompt (the conversation so far, ending with a user message) and two replies to it."""

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    tools: tuple[dict[str, Any], ...] = ()
    """The functions the prompt's assistant turns may call (rendered by the template)."""

    def sequences(self) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
        """The two conversations that are scored: the prompt (never trained) and each reply (trained)."""
        prompt = tuple(replace(m, train=False) for m in self.prompt)
        return prompt + (Message("assistant", self.chosen.content, True),), prompt + (
            Message("assistant", self.rejected.content, True),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "messages": [m.to_dict() for m in self.prompt],
            "chosen": self.chosen.to_dict(),
            "rejected": self.rejected.to_dict(),
            "source": self.source,
        }
        if self.tools:
            d["tools"] = list(self.tools)
        return {**d, **self.extra}


def _reply(obj: Any, at: str) -> Message:
    if not isinstance(obj, dict):
        raise ConversationError(f"{at}: expected an object with 'content', got {type(obj).__name__}")
    unknown = set(obj) - {"role", "content"}
    if unknown:
        raise ConversationError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
    role, content = obj.get("role", "assistant"), obj.get("content")
    if role != "assistant":
        raise ConversationError(f"{at}.role: a reply must be an assistant message, got {role!r}")
    if not isinstance(content, str):
        raise ConversationError(f"{at}.content: must be a string, got {type(content).__name__}")
    return Message("assistant", content)


def parse_preference(obj: Any, where: str = "<input>") -> Preference:
    """Validate one decoded preference record; every error starts with `where` and names the field."""
    if not isinstance(obj, dict):
        raise ConversationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            hint = "" if {"chosen", "rejected"} & set(obj) else "; a conversation file trains with method=sft"
            raise ConversationError(
                f"{where}: field {key!r} is missing (a preference record needs both replies{hint})"
            )
    conv = parse_conversation({k: v for k, v in obj.items() if k not in ("chosen", "rejected")}, where, True)
    for i, m in enumerate(conv.messages):
        if m.train is not None:
            raise ConversationError(
                f"{where}: messages[{i}].train: not allowed in a preference record (only the replies are scored)"
            )
    if conv.messages[-1].role != "user":
        raise ConversationError(
            f"{where}: messages[{len(conv.messages) - 1}].role: the prompt must end with a user message "
            f"(the replies answer it), got {conv.messages[-1].role!r}"
        )
    chosen, rejected = (
        _reply(obj["chosen"], f"{where}: chosen"),
        _reply(obj["rejected"], f"{where}: rejected"),
    )
    return Preference(conv.messages, chosen, rejected, conv.source, conv.extra, conv.tools)


def _load_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ConversationError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ConversationError(f"{where}: JSON nested too deeply to read") from None


def parse_line(line: str, where: str) -> Conversation:
    """One JSONL line -> a validated conversation; errors start with `where` (file:line)."""
    return parse_conversation(_load_line(line, where), where)


def parse_preference_line(line: str, where: str) -> Preference:
    """One JSONL line -> a validated preference record; errors start with `where` (file:line)."""
    return parse_preference(_load_line(line, where), where)


def decode_line(raw: bytes, where: str, first: bool = False) -> str:
    """A line of a JSONL file as text; a byte that is not UTF-8 is an error naming `where` and its
    column. The first line may start with a byte-order mark (Windows editors write one)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ConversationError(
            f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        ) from None


def _text_lines(path: str | Path) -> Iterator[tuple[str, str]]:
    """(line, "file:line") for every non-blank line, decoded as UTF-8 (a bad byte is an error naming
    its file, line and column)."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, f"{path}:{lineno}", lineno == 1)
            if line.strip():
                yield line, f"{path}:{lineno}"


def iter_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Yield validated conversations, reading line by line; stop at the first bad line with its file
    and line number (bad bytes, bad JSON or a broken schema)."""
    for line, where in _text_lines(path):
        yield parse_line(line, where)


def iter_preferences(path: str | Path) -> Iterator[Preference]:
    """Yield validated preference records line by line; stop at the first bad one (file:line, field)."""
    for line, where in _text_lines(path):
        yield parse_preference_line(line, where)


def read_jsonl(path: str | Path) -> list[Conversation]:
    return list(iter_jsonl(path))


def write_conversations(path: str | Path, conversations: list[Conversation]) -> int:
    return write_jsonl(path, (c.to_dict() for c in conversations))
