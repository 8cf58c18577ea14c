"""A job's pieces as OpenAI answers: one JSON body, or server-sent events in OpenAI's chunk format.

Chat and text completions differ only in the object kinds and in where the text sits (a message or a
delta, or `text`), so both go through the same two functions. A chat reply is read back through a
`ReplyStream` (the template's reply format): reasoning comes out as `reasoning_content`, tool calls as
`tool_calls` with `finish_reason: "tool_calls"`. Streamed, reasoning and content go out as deltas as
they become certain; text that may be a tool call is held back, and each call goes out once the reply
has ended and parsed, as OpenAI streams one: a chunk with its index, id, type and name, then one with
its arguments.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

from chatkit.chat import StreamInfo
from chatkit.conversation import ToolCall
from chatkit.serve.protocol import ApiError, OpenAIRequest
from chatkit.serve.worker import Job
from chatkit.templates.replies import PLAIN, Reply, ReplyStream


def envelope(kind: str, model: str) -> dict[str, Any]:
    """The fields every answer (and every chunk of one stream) carries."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def usage(info: StreamInfo) -> dict[str, int]:
    """Token counts as the engine measured them while generating."""
    return {"prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
            "total_tokens": info.prompt_tokens + info.completion_tokens}  # fmt: skip


def finish_reason(info: StreamInfo) -> str:
    """OpenAI knows only "stop" and "length"; a cancelled job's client is gone and never reads it."""
    return "length" if info.finish_reason == "length" else "stop"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def call_id(call: ToolCall) -> str:
    """The id the model wrote (Mistral's format has one, and its template wants it back), else a new
    one in OpenAI's form."""
    return call.id or f"call_{uuid.uuid4().hex[:24]}"


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    """A parsed call in OpenAI's response shape (arguments as a JSON string)."""
    args = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": call_id(call), "type": "function", "function": {"name": call.name, "arguments": args}}


def chat_message(reply: Reply) -> dict[str, Any]:
    """The assistant message of a whole answer; content is null when the reply is tool calls alone."""
    content = reply.content if reply.content or not reply.tool_calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [tool_call_json(c) for c in reply.tool_calls]
    return message


def chat_finish(info: StreamInfo, reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls else finish_reason(info)


async def respond(
    req: OpenAIRequest, job: Job, model: str, chat: bool, head: str = "", reader: ReplyStream | None = None
) -> Response:
    """The answer to `req`: streamed when it asked so, else whole. `head` (an echoed prompt) comes
    before the generated text; `reader` reads a chat reply's reasoning and tool calls (None: none)."""
    reader = reader or ReplyStream(PLAIN)
    if req.stream:
        return stream_answer(job, ChunkFormat(model, chat, req.include_usage), head, reader)
    return await whole_answer(job, model, chat, head, reader)


async def whole_answer(
    job: Job, model: str, chat: bool, head: str = "", reader: ReplyStream | None = None
) -> JSONResponse:
    """Wait for the whole reply; a generation that failed is a 500 (the request itself was fine)."""
    pieces = [head]
    async for item in job.items():
        if isinstance(item, Exception):
            raise ApiError(500, f"generation failed: {item}")
        pieces.append(item)
    text = "".join(pieces)
    choice: dict[str, Any]
    if chat:
        reader = reader or ReplyStream(PLAIN)
        reader.push(text)
        _, reply = reader.finish()
        choice = {"index": 0, "message": chat_message(reply), "logprobs": None}
        choice["finish_reason"] = chat_finish(job.info, reply)
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(job.info)}
    env = envelope("chat.completion" if chat else "text_completion", model)
    return JSONResponse({**env, "choices": [choice], "usage": usage(job.info)})


@dataclass
class ChunkFormat:
    """Builds one stream's chunks; all share one envelope (one id), as OpenAI's do."""

    model: str
    chat: bool
    include_usage: bool
    env: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.env = envelope("chat.completion.chunk" if self.chat else "text_completion", self.model)

    def piece(self, text: str | None, reason: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return self.delta(delta, reason)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._chunk(choice)

    def delta(self, delta: dict[str, Any], reason: str | None = None) -> str:
        """A chat chunk carrying `delta` (content, reasoning_content or tool_calls)."""
        return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason})

    def _chunk(self, choice: dict[str, Any]) -> str:
        return sse({**self.env, "choices": [choice]} | ({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, info: StreamInfo) -> str:
        return sse({**self.env, "choices": [], "usage": usage(info)})


def stream_answer(
    job: Job, chunks: ChunkFormat, head: str = "", reader: ReplyStream | None = None
) -> StreamingResponse:
    """Server-sent events, ending with `data: [DONE]`; closing the stream cancels the job."""
    events = _events(job, chunks, head, reader or ReplyStream(PLAIN))
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


_DELTA_KEY = {"content": "content", "reasoning": "reasoning_content"}


async def _events(job: Job, chunks: ChunkFormat, head: str, reader: ReplyStream) -> AsyncIterator[str]:
    if chunks.chat:
        yield chunks.piece("", role=True)
    elif head:  # echo: the prompt comes first
        yield chunks.piece(head)
    async for item in job.items():
        if isinstance(item, Exception):  # the status is sent already: the error goes in the stream
            yield sse(ApiError(500, f"generation failed: {item}").body())
            break
        if not chunks.chat:
            yield chunks.piece(item)
            continue
        for kind, text in reader.push(item):
            yield chunks.delta({_DELTA_KEY[kind]: text})
    else:
        if chunks.chat:
            for event in _chat_ending(job, chunks, reader):
                yield event
        else:
            yield chunks.piece("", finish_reason(job.info))
        if chunks.include_usage:
            yield chunks.usage_chunk(job.info)
    yield "data: [DONE]\n\n"


def _chat_ending(job: Job, chunks: ChunkFormat, reader: ReplyStream) -> list[str]:
    """What was held back, then each tool call (index, id, type and name; then its arguments), then
    the chunk with the finish reason."""
    deltas, reply = reader.finish()
    events = [chunks.delta({_DELTA_KEY[kind]: text}) for kind, text in deltas]
    for i, call in enumerate(reply.tool_calls):
        full = tool_call_json(call)
        head = {"index": i, "id": full["id"], "type": "function",
                "function": {"name": call.name, "arguments": ""}}  # fmt: skip
        events.append(chunks.delta({"tool_calls": [head]}))
        args = {"index": i, "function": {"arguments": full["function"]["arguments"]}}
        events.append(chunks.delta({"tool_calls": [args]}))
    events.append(chunks.delta({}, chat_finish(job.info, reply)))
    return events
