"""Tool-calling conversations from a local file or folder in one of the common public layouts.

The layout is detected per row by its keys (data/toolcall/README.md shows one example of each):

- ShareGPT as LLaMA-Factory writes tool use (its `glaive_toolcall_en_demo.json`, glaive-function-calling-v2
  converted; `"formatting": "sharegpt"` in its data/README.md): `conversations` turns `{from, value}`
  with `from` one of human/user, gpt/assistant, function_call (the value a JSON call `{"name",
  "arguments"}` or a list of them), observation (a tool result), system (first only); an optional
  `system` string; `tools` a JSON string (or a list) of function schemas, bare (glaive's) or
  OpenAI-wrapped. Calls get ids (`call00001`, ...: nine characters, as Mistral's template wants), and
  each result answers the oldest call not yet answered.
- OpenAI: `messages` with `tool_calls` (arguments a JSON string or an object), `tool` results with
  `tool_call_id`, and `tools`; checked as chatkit's own conversation format is.

In both, reasoning becomes the message's `reasoning`: a `reasoning_content` (or `reasoning`) field, or
a `<think>...</think>` block opening a reply's text (Qwen3's and DeepSeek-R1's traces). A row that
breaks its layout (a call that is not JSON, a tool list that is not one) stops the run naming the file,
the row and the field; rows the data makes unusable (an unknown speaker, an empty turn) are skipped and
counted. There is no hub repository to download from: --source is required.
"""

from __future__ import annotations

import json
from typing import Any

from chatkit.conversation import Conversation, ConversationError, Message, ToolCall, parse_conversation
from chatkit.datasets import sharegpt
from chatkit.datasets.spec import DatasetSpec, RowError, Skip, field
from chatkit.templates.replies import THINK, ReplyFormat

ROLES = {**sharegpt.ROLES, "assistant": "assistant", "function_call": "assistant", "observation": "tool"}
"""ShareGPT speakers (LLaMA-Factory's tags) -> chatkit roles."""

_THINK = ReplyFormat(think=THINK)


def _with_reasoning(m: Message) -> Message:
    """A reply whose text opens with a <think> block: the block as its reasoning, the rest as text."""
    if m.role != "assistant" or m.reasoning is not None or THINK[1] not in m.content:
        return m
    reasoning, rest = _THINK.split_think(m.content)
    return Message("assistant", rest.strip(), m.train, m.tool_calls, reasoning=reasoning or None)


def _json(text: str, at: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError(f"{at}: not JSON ({e.msg} at column {e.colno})") from None


def tools_of(row: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The row's `tools` (a JSON string or a list) as OpenAI function schemas; bare function objects
    (glaive's) are wrapped."""
    raw = field(row, "tools", (str, list), optional=True)
    tools = _json(raw, "field 'tools'") if isinstance(raw, str) else raw or []
    if not isinstance(tools, list):
        raise RowError(f"field 'tools': expected a list of function schemas, got {type(tools).__name__}")
    out = []
    for k, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"field 'tools'[{k}]: expected a function schema with a name, got {t!r:.80}")
        out.append(t if t.get("type") == "function" else {"type": "function", "function": t})
    return tuple(out)


def _calls(value: str, at: str, first_id: int) -> tuple[ToolCall, ...]:
    """A function_call turn's value: one JSON call or a list of them (LLaMA-Factory's parallel calls)."""
    obj = _json(value, at)
    calls = []
    for j, c in enumerate(obj if isinstance(obj, list) else [obj]):
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not name:
            raise RowError(f'{at}: a call needs {{"name": ..., "arguments": {{...}}}}, got {c!r:.80}')
        args = c.get("arguments", {})
        args = _json(args, f"{at}.arguments") if isinstance(args, str) else args
        if not isinstance(args, dict):
            raise RowError(f"{at}.arguments: expected an object, got {type(args).__name__}")
        calls.append(ToolCall(name, args, f"call{first_id + j:05d}"))
    return tuple(calls)


def from_sharegpt(row: dict[str, Any]) -> Conversation:
    """LLaMA-Factory's ShareGPT tool layout (see the module's docstring)."""
    turns, tools = field(row, "conversations", list), tools_of(row)
    system = field(row, "system", optional=True)
    messages = [Message("system", system.strip())] if system and system.strip() else []
    pending: list[ToolCall] = []  # calls made and not yet answered, oldest first
    made = 0
    for i, turn in enumerate(turns):
        at = f"field 'conversations'[{i}]"
        speaker, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if not isinstance(value, str):
            raise RowError(f"{at}.value: expected str, got {type(value).__name__}")
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise Skip(f"unknown role {speaker!r}")
        if role == "system" and (i > 0 or messages):
            raise Skip("system turn after the first")
        if speaker == "function_call":
            reasoning, rest = _THINK.split_think(value)
            calls = _calls(rest, f"{at}.value", made + 1)
            made += len(calls)
            pending += calls
            messages.append(Message("assistant", "", tool_calls=calls, reasoning=reasoning))
        elif role == "tool":
            answered = pending.pop(0) if pending else None
            call_id, name = (answered.id, answered.name) if answered else (None, None)
            messages.append(Message("tool", value.strip(), tool_call_id=call_id, name=name))
        else:
            messages.append(_with_reasoning(Message(role, value.strip())))
    return Conversation(tuple(messages), tools=tools)


def _openai_message(m: Any) -> Any:
    """Nulls dropped (exports write `"refusal": null` and the like); `reasoning_content` as chatkit's
    `reasoning`."""
    if not isinstance(m, dict):
        return m
    out = {k: v for k, v in m.items() if v is not None or k == "content"}
    if "reasoning" in out and "reasoning_content" not in out:
        out["reasoning_content"] = out.pop("reasoning")
    return out


def from_openai(row: dict[str, Any]) -> Conversation:
    """OpenAI messages with tool calls and a `tools` list, checked as chatkit conversations are."""
    messages = [_openai_message(m) for m in field(row, "messages", list)]
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] not in ROLES.values():
            raise Skip(f"unknown role {m['role']!r}")
    try:
        conv = parse_conversation({"messages": messages}, "")
    except ConversationError as e:  # names the message and its field: messages[2].tool_calls[0]...
        raise RowError(str(e).removeprefix(": ")) from None
    return Conversation(tuple(_with_reasoning(m) for m in conv.messages), tools=tools_of(row))


def to_conversations(row: Any) -> list[Conversation]:
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if "conversations" in row:
        return [from_sharegpt(row)]
    if "messages" in row:
        return [from_openai(row)]
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowError(
        "no known tool-call layout: expected field 'conversations' (ShareGPT, LLaMA-Factory) or "
        f"'messages' (OpenAI), see data/toolcall/README.md; got {keys}"
    )


SPEC = DatasetSpec(
    name="toolcall",
    repo=None,
    files=("*.jsonl", "*.json", "*.jsonl.gz", "*.jsonl.zst", "*.parquet"),
    to_conversations=to_conversations,
    description="Tool-calling conversations (with tools, calls, results and reasoning) from a local file "
    "or folder in a common public layout, detected per row: ShareGPT function_call/observation turns "
    "with a tools string (LLaMA-Factory's glaive_toolcall files), or OpenAI messages with tool_calls "
    "and tools. <think> blocks and reasoning_content become the reply's reasoning.",
)
