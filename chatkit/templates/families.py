"""Templates of today's model families, with tool calls, tool results and reasoning: `llama3`, `qwen3`,
`mistral`, `gemma`.

Their published Jinja templates are not prefix-stable (Qwen3 drops past reasoning, Mistral moves the
system message into the last user turn, Llama 3.1 moves the first user message after the tool list), so
the `hf` prefix segmentation cannot label them. Each is written here as a Python renderer that mirrors
its published template step by step and yields labelled segments; the exported `chat_template` is the
published Jinja with `{% generation %}` around the trained text (chatkit/templates/family_jinja.py).
Tests render both against the verbatim published templates (tests/fixtures/chat_templates/, sources in
SOURCES.md there) and compare text, tokens and the generation mask with chatkit's labels.

Labels: a reply's text, its tool calls and its end-of-turn token are trained, the turn's header is not
(it is the generation prompt); a tool result never is; reasoning is trained with the reply
(`reasoning="train"`) or kept in the text untrained (`"context"`), where the family's template keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from chatkit.conversation import Message
from chatkit.templates import family_jinja, replies
from chatkit.templates.base import REASONING_POLICIES, Segment, Tools
from chatkit.templates.replies import Reply, ReplyFormat


def _tojson(value: Any, indent: int | None = None) -> str:
    """transformers' `tojson` filter (chat_template_utils: json.dumps, ensure_ascii=False, keys in order)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


class _Out:
    """Segments as they are written; empty ones are dropped."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def add(self, text: str, trained: bool = False) -> None:
        if text:
            self.segments.append(Segment(text, trained))


def _refuse(template: str, messages: Sequence[Message], what: str, bad: Callable[[Message], bool]) -> None:
    for i, m in enumerate(messages):
        if bad(m):
            raise ValueError(
                f"chat template {template!r} has no format for {what} (messages[{i}]); "
                "qwen3 renders reasoning, llama3, qwen3 and mistral tool calls"
            )


def _only_calls(template: str, i: int, m: Message) -> None:
    """Llama 3.1 and Mistral render a tool-calling reply as its calls alone: refuse text that would be
    silently lost from training."""
    if m.tool_calls and m.content.strip():
        raise ValueError(
            f"chat template {template!r} renders a reply with tool calls as the calls alone, so the text of "
            f"messages[{i}] would be lost; put it in an assistant message of its own"
        )


@dataclass(frozen=True)
class FamilyTemplate:
    """What the four families share: the `Template` interface over a `_write` that renders one
    conversation into `_Out` as the family's published template does."""

    name: str
    description: str
    stop_strings: tuple[str, ...]
    special_tokens: tuple[str, ...]
    reasoning: str = "train"
    """Reasoning policy: `train` (with the reply) or `context` (in the text, untrained)."""
    default_system: str | None = None
    reply_format: ReplyFormat = replies.PLAIN
    """How the renderer below writes a reply's reasoning and tool calls, to read them back."""

    def __post_init__(self) -> None:
        if self.reasoning not in REASONING_POLICIES:
            raise ValueError(
                f"reasoning policy must be one of {', '.join(REASONING_POLICIES)}, got {self.reasoning!r}"
            )

    def with_reasoning(self, policy: str) -> FamilyTemplate:
        """This template with another reasoning policy (it changes labels and `chat_template`, so the
        tokenized-data cache key too)."""
        return replace(self, reasoning=policy)

    @property
    def chat_template(self) -> str:
        raise NotImplementedError

    def _write(
        self,
        out: _Out,
        msgs: list[Message],
        eos: str,
        bos: str,
        gen: bool,
        tools: Tools | None,
        thinking: bool | None,
    ) -> None:
        """Write the conversation (`msgs`, a copy the method may consume) as the family's template does."""
        raise NotImplementedError

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
        """Render as the family's published template does; segments trained as the module says."""
        out = _Out()
        self._write(out, list(messages), eos_token, bos_token, add_generation_prompt, tools or None, thinking)
        return out.segments

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
        segs = self.segments(
            messages, eos_token, bos_token, add_generation_prompt, tools=tools, thinking=thinking
        )
        return "".join(s.text for s in segs)

    def reply_text(self, generated: str) -> str:
        """The reply as generated, trimmed as these templates trim it (reasoning and tool calls are still
        in it: `parse_reply` reads them out)."""
        return generated.strip()

    def parse_reply(self, generated: str, tools: bool = True) -> Reply:
        """(content, tool_calls, reasoning) of a reply, read as the renderer writes them."""
        return self.reply_format.parse(generated, tools)


# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json chat_template (fixture llama3.jinja): a system
# header with the knowledge cutoff and date_string (default "26 Jul 2024"), the tool list put into the
# first user message (tools_in_user_message defaults to true), a reply with tool calls written as one
# JSON call {"name", "parameters"} (the template refuses more than one), tool results under the
# `ipython` header as JSON (a string is iterable in Jinja, so it is quoted). Every text is trimmed.
@dataclass(frozen=True)
class Llama3Template(FamilyTemplate):
    date_string: str = "26 Jul 2024"
    """The template's default `Today Date` (a caller of apply_chat_template may pass another)."""

    @property
    def chat_template(self) -> str:
        return family_jinja.LLAMA3

    def _write(
        self,
        out: _Out,
        msgs: list[Message],
        eos: str,
        bos: str,
        gen: bool,
        tools: Tools | None,
        thinking: bool | None,
    ) -> None:
        _refuse(self.name, msgs, "reasoning", lambda m: m.reasoning is not None)
        out.add(bos)
        system = msgs.pop(0) if msgs and msgs[0].role == "system" else None
        head = "<|start_header_id|>system<|end_header_id|>\n\n" + ("Environment: ipython\n" if tools else "")
        head += f"Cutting Knowledge Date: December 2023\nToday Date: {self.date_string}\n\n"
        out.add(
            head + (system.content.strip() if system else "") + "<|eot_id|>", bool(system and system.trained)
        )
        start = 0
        if tools:
            if not msgs:
                raise ValueError(
                    "Cannot put tools in the first user message when there's no first user message!"
                )
            text = (
                "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond "
            )
            text += "with a JSON for a function call with its proper arguments that best answers the given prompt."
            text += (
                '\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name '
            )
            text += "and its value}.Do not use variables.\n\n"
            text += "".join(_tojson(dict(t), indent=4) + "\n\n" for t in tools)
            out.add(text + msgs[0].content.strip() + "<|eot_id|>", msgs[0].trained)
            start = 1
        for i, m in enumerate(msgs[start:], start):
            if m.role == "tool":
                out.add(f"<|start_header_id|>ipython<|end_header_id|>\n\n{_tojson(m.content)}<|eot_id|>")
            elif m.tool_calls:
                if len(m.tool_calls) != 1:
                    raise ValueError("This model only supports single tool-calls at once!")
                _only_calls(self.name, i, m)
                call = m.tool_calls[0]
                out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
                text = f'{{"name": "{call.name}", "parameters": {_tojson(call.arguments)}}}<|eot_id|>'
                out.add(text, m.trained)
            elif m.role == "assistant":
                out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
                out.add(m.content.strip() + "<|eot_id|>", m.trained)
            else:
                out.add(
                    f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content.strip()}<|eot_id|>",
                    m.trained,
                )
        if gen:
            out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")


_QWEN3_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN3_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)


def _split_think(m: Message) -> tuple[str, str]:
    """(reasoning, content) as Qwen3's template reads them: `reasoning_content`, else a
    `<think>...</think>` written at the start of the content."""
    if m.reasoning is not None:
        return m.reasoning, m.content
    if "</think>" not in m.content:
        return "", m.content
    reasoning = m.content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, m.content.split("</think>")[-1].lstrip("\n")


# Qwen/Qwen3 tokenizer_config.json chat_template (fixture qwen3.jinja, Qwen3-0.6B's; the family shares
# it): ChatML, tools in the system turn, calls as <tool_call> JSON, results as <tool_response> blocks in
# one user turn. Reasoning is written only for replies after the last real user query (a past turn's is
# dropped, so never trained); the last reply always gets a think block, empty when it has none. The
# generation prompt ends with an empty think block when thinking is off (enable_thinking=False).
@dataclass(frozen=True)
class Qwen3Template(FamilyTemplate):
    @property
    def chat_template(self) -> str:
        return family_jinja.QWEN3_TRAIN if self.reasoning == "train" else family_jinja.QWEN3_CONTEXT

    def _write(
        self,
        out: _Out,
        msgs: list[Message],
        eos: str,
        bos: str,
        gen: bool,
        tools: Tools | None,
        thinking: bool | None,
    ) -> None:
        has_system = bool(msgs) and msgs[0].role == "system"
        if tools:
            text = (
                "<|im_start|>system\n" + (msgs[0].content + "\n\n" if has_system else "") + _QWEN3_TOOLS_HEAD
            )
            text += "".join("\n" + _tojson(dict(t)) for t in tools) + _QWEN3_TOOLS_TAIL
            out.add(text, has_system and msgs[0].trained)
        elif has_system:
            out.add(f"<|im_start|>system\n{msgs[0].content}<|im_end|>\n", msgs[0].trained)
        last_query = next(
            (
                i
                for i in reversed(range(len(msgs)))
                if msgs[i].role == "user"
                and not (
                    msgs[i].content.startswith("<tool_response>")
                    and msgs[i].content.endswith("</tool_response>")
                )
            ),
            len(msgs) - 1,
        )
        for i, m in enumerate(msgs):
            if m.role == "user" or (m.role == "system" and i > 0):
                out.add(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n", m.trained)
            elif m.role == "assistant":
                self._reply(out, m, i > last_query and (i == len(msgs) - 1 or bool(_split_think(m)[0])))
            elif m.role == "tool":
                opens = i == 0 or msgs[i - 1].role != "tool"
                closes = i == len(msgs) - 1 or msgs[i + 1].role != "tool"
                text = "<|im_start|>user" if opens else ""
                out.add(
                    text
                    + f"\n<tool_response>\n{m.content}\n</tool_response>"
                    + ("<|im_end|>\n" if closes else "")
                )
        if gen:
            out.add("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if thinking is False else ""))

    def _reply(self, out: _Out, m: Message, show_think: bool) -> None:
        reasoning, content = _split_think(m)
        out.add("<|im_start|>assistant\n")
        think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" if show_think else ""
        body = content.lstrip("\n") if show_think else content
        for j, call in enumerate(m.tool_calls):
            if j or content:  # the template tests the content before its lstrip
                body += "\n"
            body += f'<tool_call>\n{{"name": "{call.name}", "arguments": {_tojson(call.arguments)}}}\n</tool_call>'
        if self.reasoning == "context":
            out.add(think)
            think = ""
        out.add(think + body + "<|im_end|>", m.trained)
        out.add("\n")


# mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json chat_template (fixture mistral.jinja): [INST]
# turns, the tool list before the last user turn, calls as a [TOOL_CALLS] JSON list ending with the eos,
# results in [TOOL_RESULTS]. The system message goes before the last user message only when that message
# ends the conversation, so a training conversation (ending with a reply) loses it: the template does
# that, and training text must be what the model will be prompted with. Call ids must be 9 characters.
@dataclass(frozen=True)
class MistralTemplate(FamilyTemplate):
    @property
    def chat_template(self) -> str:
        return family_jinja.MISTRAL

    def _write(
        self,
        out: _Out,
        msgs: list[Message],
        eos: str,
        bos: str,
        gen: bool,
        tools: Tools | None,
        thinking: bool | None,
    ) -> None:
        _refuse(self.name, msgs, "reasoning", lambda m: m.reasoning is not None)
        system = msgs.pop(0).content if msgs and msgs[0].role == "system" else None
        turn = 0
        for i, m in enumerate(msgs):
            if not (m.role == "tool" or m.tool_calls):
                if (m.role == "user") != (turn % 2 == 0):
                    raise ValueError(
                        "After the optional system message, conversation roles must alternate "
                        f"user/assistant/user/assistant/... (mistral, message {i} after the system message)"
                    )
                turn += 1
        out.add(bos)
        users = [m for m in msgs if m.role == "user"]
        for i, m in enumerate(msgs):
            if m.role == "user":
                # the template compares message dicts: every user message equal to the last gets the tools
                text = _mistral_tools(tools) if tools and m.content == users[-1].content else ""
                prefix = system + "\n\n" if i == len(msgs) - 1 and system is not None else ""
                out.add(f"{text}[INST] {prefix}{m.content}[/INST]", m.trained)
            elif m.tool_calls:
                _only_calls(self.name, i, m)
                calls = []
                for call in m.tool_calls:
                    _mistral_id(call.id, i)
                    fn = _tojson({"name": call.name, "arguments": call.arguments})
                    calls.append(fn[:-1] + f', "id": "{call.id}"}}')
                out.add("[TOOL_CALLS] [" + ", ".join(calls) + "]" + eos, m.trained)
            elif m.role == "assistant":
                out.add(" " + m.content.strip() + eos, m.trained)
            elif m.role == "tool":
                _mistral_id(m.tool_call_id, i)
                out.add(
                    f'[TOOL_RESULTS] {{"content": {m.content}, "call_id": "{m.tool_call_id}"}}[/TOOL_RESULTS]'
                )
            else:
                raise ValueError(
                    "Only user and assistant roles are supported, with the exception of an initial optional "
                    "system message!"
                )


def _mistral_id(call_id: str | None, i: int) -> None:
    if call_id is None or len(call_id) != 9:
        raise ValueError(
            f"Tool call IDs should be alphanumeric strings with length 9! (mistral, messages around {i}: "
            f"{call_id!r})"
        )


def _mistral_tools(tools: Tools) -> str:
    """The [AVAILABLE_TOOLS] list as the template writes it: string values unescaped, others as JSON."""
    out = []
    for tool in tools:
        fn = tool["function"]
        fields = [
            f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {_tojson(v)}'
            for k, v in fn.items()
            if k != "return"
        ]
        out.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
    return "[AVAILABLE_TOOLS] [" + ", ".join(out) + "][/AVAILABLE_TOOLS]"


# Gemma: <start_of_turn>user|model ... <end_of_turn>, every text trimmed. Gemma 2's published template
# (google/gemma-2-*-it, fixture gemma2.jinja) refuses a system message; Gemma 3's (google/gemma-3-*-it,
# fixture gemma3.jinja), the family's current one, puts it before the first user turn's text followed by
# a blank line. chatkit follows Gemma 3; without a system message the two render the same text.
@dataclass(frozen=True)
class GemmaTemplate(FamilyTemplate):
    @property
    def chat_template(self) -> str:
        return family_jinja.GEMMA

    def _write(
        self,
        out: _Out,
        msgs: list[Message],
        eos: str,
        bos: str,
        gen: bool,
        tools: Tools | None,
        thinking: bool | None,
    ) -> None:
        if tools:
            raise ValueError(
                "chat template 'gemma' has no format for tool definitions; use llama3, qwen3 or mistral"
            )
        _refuse(self.name, msgs, "tool calls, tool results or reasoning", lambda m: m.uses_tools_or_reasoning)
        prefix = msgs.pop(0).content + "\n\n" if msgs and msgs[0].role == "system" else ""
        for i, m in enumerate(msgs):
            if (m.role == "user") != (i % 2 == 0):
                raise ValueError(
                    "Conversation roles must alternate user/assistant/user/assistant/... (gemma)"
                )
        out.add(bos)
        for i, m in enumerate(msgs):
            head = (
                "<start_of_turn>"
                + ("model" if m.role == "assistant" else m.role)
                + "\n"
                + (prefix if i == 0 else "")
            )
            if m.role == "assistant":
                out.add(head)
                out.add(m.content.strip() + "<end_of_turn>", m.trained)
                out.add("\n")
            else:
                out.add(head + m.content.strip() + "<end_of_turn>\n", m.trained)
        if gen:
            out.add("<start_of_turn>model\n")


LLAMA3 = Llama3Template(
    name="llama3",
    description="Meta Llama 3.1+ Instruct: <|start_header_id|>role<|end_header_id|>, JSON tool calls, ipython results",
    stop_strings=("<|eot_id|>", "<|eom_id|>"),
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    reply_format=replies.LLAMA3,
)
QWEN3 = Qwen3Template(
    name="qwen3",
    description="Qwen3: ChatML with <think> reasoning, <tool_call> JSON and <tool_response> results",
    stop_strings=("<|im_end|>",),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    reply_format=replies.QWEN3,
)
MISTRAL = MistralTemplate(
    name="mistral",
    description="Mistral-7B-Instruct-v0.3: [INST] turns, [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]",
    stop_strings=(),
    special_tokens=(
        "[INST]",
        "[/INST]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_CALLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
    ),
    reply_format=replies.MISTRAL,
)
GEMMA = GemmaTemplate(
    name="gemma",
    description="Gemma: <start_of_turn>user|model ... <end_of_turn>; a system message opens the first user turn",
    stop_strings=("<end_of_turn>",),
    special_tokens=("<start_of_turn>", "<end_of_turn>"),
)

FAMILY_TEMPLATES: tuple[FamilyTemplate, ...] = (LLAMA3, QWEN3, MISTRAL, GEMMA)
"""Every family template, in registration order."""
