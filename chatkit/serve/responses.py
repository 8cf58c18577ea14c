"""A job's pieces as OpenAI answers: one JSON body, or server-sent events in OpenAI's chunk format.

Chat and text completions differ only in the object kinds and in where the text sits (a message or a
delta, or `text`), so both go through the same two functions.
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
from chatkit.serve.protocol import ApiError, OpenAIRequest
from chatkit.serve.worker import Job


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


async def respond(req: OpenAIRequest, job: Job, model: str, chat: bool, head: str = "") -> Response:
    """The answer to `req`: streamed when it asked so, else whole. `head` (an echoed prompt) comes
    before the generated text."""
    if req.stream:
        return stream_answer(job, ChunkFormat(model, chat, req.include_usage), head)
    return await whole_answer(job, model, chat, head)


async def whole_answer(job: Job, model: str, chat: bool, head: str = "") -> JSONResponse:
    """Wait for the whole reply; a generation that failed is a 500 (the request itself was fine)."""
    pieces = [head]
    async for item in job.items():
        if isinstance(item, Exception):
            raise ApiError(500, f"generation failed: {item}")
        pieces.append(item)
    text = "".join(pieces)
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        if chat
        else {"index": 0, "text": text, "logprobs": None}
    )
    choice["finish_reason"] = finish_reason(job.info)
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
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return sse({**self.env, "choices": [choice]} | ({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, info: StreamInfo) -> str:
        return sse({**self.env, "choices": [], "usage": usage(info)})


def stream_answer(job: Job, chunks: ChunkFormat, head: str = "") -> StreamingResponse:
    """Server-sent events, ending with `data: [DONE]`; closing the stream cancels the job."""
    return StreamingResponse(
        _events(job, chunks, head), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _events(job: Job, chunks: ChunkFormat, head: str) -> AsyncIterator[str]:
    if chunks.chat:
        yield chunks.piece("", role=True)
    elif head:  # echo: the prompt comes first
        yield chunks.piece(head)
    async for item in job.items():
        if isinstance(item, Exception):  # the status is sent already: the error goes in the stream
            yield sse(ApiError(500, f"generation failed: {item}").body())
            break
        yield chunks.piece(item)
    else:
        yield chunks.piece(None if chunks.chat else "", finish_reason(job.info))
        if chunks.include_usage:
            yield chunks.usage_chunk(job.info)
    yield "data: [DONE]\n\n"
