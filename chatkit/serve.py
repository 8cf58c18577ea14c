"""The served chat: a web page at `/` and an OpenAI-compatible API, on the shared chat engine.

    python inference/serve.py --model outputs/demo/hf [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), `GET /v1/models`,
`GET /health`. One worker thread runs one generation at a time, in arrival order, so concurrent
clients each get their own, unmixed answer. A stream whose client goes away is cancelled.
Bad requests get a 4xx with an OpenAI-shaped `{"error": {"message": ...}}` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatkit.chat import ChatEngine, ContextProvider, GenerationParams, StreamInfo, with_context
from chatkit.conversation import Message
from chatkit.tokenization import encode_prompt

_END = object()  # a job's last queue item


class ApiError(Exception):
    """Answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- request bodies (strict: a string where a number belongs is a 400, not a guess) --------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    """Not in OpenAI's API; a common extension (0: off)."""
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]


class ChatRequest(_Request):
    messages: list[_ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False


def _validation_message(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    where = ".".join(str(x) for x in first["loc"]) or "body"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _parse(body: bytes, model: type[BaseModel]) -> Any:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise ApiError(400, _validation_message(e)) from None


def to_messages(req: ChatRequest) -> list[Message]:
    """OpenAI messages -> chatkit messages (developer counts as system; text parts are joined)."""
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        if role == "system" and i != 0:
            raise ApiError(400, "a system message may only come first", f"messages.{i}.role")
        out.append(Message(role, text))
    if out[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", f"messages.{len(out) - 1}.role")
    return out


# --- the generation worker -------------------------------------------------------------------------


@dataclass
class Job:
    run: Any  # () -> Iterator[str], called on the worker thread
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    info: StreamInfo = field(default_factory=StreamInfo)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancel.set()


class Worker:
    """One thread, one generation at a time, jobs in arrival order."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0
        self.thread = threading.Thread(target=self._loop, name="chatkit-generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.pending += 1
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if not job.cancel.is_set():
                    for piece in job.run():
                        job.put(piece)
            except Exception as e:  # reported to that request only; the server goes on
                job.put(e)
            finally:
                self.pending -= 1
                job.put(_END)


# --- the app ----------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    model_name: str
    defaults: GenerationParams
    api_key: str | None = None
    max_queue: int = 64
    context_provider: ContextProvider | None = None
    """Retrieval: passages for the newest user turn, added to that request's prompt only."""


def _params(req: _Request, defaults: GenerationParams, max_tokens: int) -> GenerationParams:
    p = replace(defaults, max_new_tokens=max_tokens)
    if req.temperature is not None:
        p.temperature, p.sample = req.temperature, req.temperature > 0
    if req.top_p is not None:
        p.top_p = req.top_p
    if req.top_k is not None:
        p.top_k = req.top_k
    return p


def _stops(req: _Request) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
    return stops


def _max_tokens(requested: int | None, default: int, prompt_len: int, context: int) -> int:
    room = context - prompt_len
    if requested is None:
        if room < 1:
            raise ApiError(
                400, f"the prompt ({prompt_len} tokens) fills the model's context of {context} tokens",
                "messages", "context_length_exceeded",
            )  # fmt: skip
        return min(default, room)
    if not 1 <= requested <= context:
        raise ApiError(400, f"max_tokens: must be between 1 and {context}, got {requested}", "max_tokens")
    if requested > room:
        raise ApiError(
            400, f"the prompt ({prompt_len} tokens) plus max_tokens ({requested}) exceeds the model's "
            f"context of {context} tokens", "messages", "context_length_exceeded",
        )  # fmt: skip
    return requested


def create_app(engine: ChatEngine, config: ServerConfig):
    worker = Worker()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    app = FastAPI(title="chatkit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    page = resources.files("chatkit.web").joinpath("index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), config.api_key):
            raise ApiError(
                401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key"
            )

    def start(run, loop) -> Job:
        if worker.pending >= config.max_queue:
            raise ApiError(503, f"the server is busy ({worker.pending} requests waiting); retry later")
        job = Job(run, loop)
        worker.submit(job)
        return job

    async def events(job: Job) -> AsyncIterator[str | Exception]:
        try:
            while (item := await job.out.get()) is not _END:
                yield item
        finally:  # the client went away (or we are done): stop generating for it
            job.cancel.set()

    def envelope(kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": config.model_name}  # fmt: skip

    def usage(info: StreamInfo) -> dict[str, int]:
        return {"prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
                "total_tokens": info.prompt_tokens + info.completion_tokens}  # fmt: skip

    def finish(info: StreamInfo) -> str:
        return "length" if info.finish_reason == "length" else "stop"

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def respond(req: _Request, job: Job, chat: bool, head: str = ""):
        if not req.stream:
            pieces = [head]
            async for item in events(job):
                if isinstance(item, Exception):
                    raise ApiError(500, f"generation failed: {item}")
                pieces.append(item)
            text, env = "".join(pieces), envelope("chat.completion" if chat else "text_completion")
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
                if chat
                else {"index": 0, "text": text, "logprobs": None}
            )
            choice["finish_reason"] = finish(job.info)
            return JSONResponse({**env, "choices": [choice], "usage": usage(job.info)})
        env = envelope("chat.completion.chunk" if chat else "text_completion")
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(piece: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | (
                    {"content": piece} if piece is not None else {}
                )
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            return sse({**env, "choices": [choice]} | ({"usage": None} if include_usage else {}))

        async def body() -> AsyncIterator[str]:
            if chat:
                yield chunk("", role=True)
            elif head:  # echo: the prompt comes first
                yield chunk(head)
            async for item in events(job):
                if isinstance(item, Exception):
                    yield sse(ApiError(500, f"generation failed: {item}").body())
                    break
                yield chunk(item)
            else:
                yield chunk(None if chat else "", finish(job.info))
                if include_usage:
                    yield sse({**env, "choices": [], "usage": usage(job.info)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = _parse(await request.body(), ChatRequest)
        messages, stops = to_messages(req), _stops(req)
        if config.context_provider is not None:  # embedding + search: off the event loop
            messages = with_context(messages, await asyncio.to_thread(config.context_provider, messages))
        prompt_len = len(encode_prompt(engine.tokenizer, engine.template, messages))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n = _max_tokens(requested, config.defaults.max_new_tokens, prompt_len, engine.context_length)
        params = _params(req, config.defaults, n)
        loop = asyncio.get_running_loop()
        job: Job

        def run() -> Iterator[str]:
            return engine.stream(messages, params, req.seed, stop=stops, info=job.info, cancel=job.cancel)

        job = start(run, loop)
        return await respond(req, job, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = _parse(await request.body(), CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request", "prompt")
        prompt, stops = prompts[0], _stops(req)
        prompt_len = len(engine.tokenizer.encode(prompt, add_special_tokens=False))
        if prompt_len == 0:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        n = _max_tokens(req.max_tokens, 16, prompt_len, engine.context_length)  # OpenAI's default: 16
        params = _params(req, config.defaults, n)
        job: Job

        def run() -> Iterator[str]:
            return engine.complete(prompt, params, req.seed, stop=stops, info=job.info, cancel=job.cancel)

        job = start(run, asyncio.get_running_loop())
        return await respond(req, job, chat=False, head=prompt if req.echo else "")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "chatkit",
                "context_length": engine.context_length}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "waiting": worker.pending}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os
    from pathlib import Path

    from chatkit.bot import (
        add_generation_args,
        add_loading_args,
        add_retrieval_args,
        engine_from_args,
        params_from_args,
        retrieval_from_args,
    )

    p = argparse.ArgumentParser(description="Serve a web chat and an OpenAI-compatible API for a model.")
    p.add_argument("--model", required=True, help="Hugging Face folder (e.g. outputs/demo/hf)")
    p.add_argument("--template", help="chat template (default: the one recorded in the model folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--api-key", default=os.environ.get("CHATKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $CHATKIT_API_KEY, else none)")  # fmt: skip
    p.add_argument("--model-name", help="the model id the API reports (default: the folder's name)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 503 (64)")
    add_generation_args(p, max_tokens=256)
    add_loading_args(p)
    add_retrieval_args(p)
    args = p.parse_args(argv)
    engine = engine_from_args(p, args)
    name = args.model_name or Path(args.model).resolve().name
    config = ServerConfig(
        name, params_from_args(args), args.api_key, args.max_queue, retrieval_from_args(p, args)
    )
    import uvicorn

    uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level="info")
