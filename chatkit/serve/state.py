"""The server's state and the FastAPI dependencies that hand it to the routes.

`create_app` builds one `ServerState` and keeps it on `app.state.chatkit`; the routes never close
over it or reach for a global, so two apps in one process (tests, benchmarks) stay apart, and each
route says in its signature exactly what it uses.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from chatkit.chat import ChatEngine, ContextProvider, GenerationParams
from chatkit.serve.guard import WILDCARD_ADDRESSES, HostRules
from chatkit.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_body
from chatkit.serve.worker import Worker

_T = TypeVar("_T")

MAX_BODY = 1 << 20
"""The default limit on a request body: 1 MiB, some 250,000 tokens of text, far past any context."""


@dataclass
class ServerConfig:
    model_name: str
    defaults: GenerationParams
    api_key: str | None = None
    """None: no key. An empty key is refused here: it must never match an empty bearer token."""
    max_queue: int = 64
    max_batch: int = 8
    """Requests decoded together, one forward per token for all of them (`chatkit.batching`); 1: one
    at a time."""
    context_provider: ContextProvider | None = None
    """Retrieval: passages for the newest user turn, added to that request's prompt only."""
    max_body: int = MAX_BODY
    """Bytes a request body may hold; a longer one gets 413 before it is read further."""
    host: str = "127.0.0.1"
    """The address the server is bound to: Host headers naming it (or a loopback name) are accepted."""
    port: int | None = None
    """The port it listens on, which Host headers must name; None (an app served in-process, the
    port unknown): any port."""
    allowed_hosts: tuple[str, ...] = ()
    """More names clients may use in the Host header: `NAME` (any port) or `NAME:PORT`; `*`: any."""

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty: set a real key, or none at all for an open API")
        if self.max_batch < 1:
            raise ValueError(f"the batch must hold at least 1 request, got {self.max_batch}")
        if self.max_body < 1:
            raise ValueError(f"the body limit must be at least 1 byte, got {self.max_body}")
        self.allowed_hosts = tuple(self.allowed_hosts)
        if self.host in WILDCARD_ADDRESSES and not self.allowed_hosts:
            raise ValueError(
                f"binding {self.host or 'every address'} serves every network this machine is on: "
                "name the hosts clients will use with --allowed-host NAME (or '*' to accept any Host)"
            )
        self.host_rules()  # a malformed name is a ValueError now, not at the first request

    def host_rules(self) -> HostRules:
        return HostRules.make(self.host, self.port, self.allowed_hosts)


PREPARING = 2
"""Requests parsed or measured at once, off the event loop. More threads would not finish sooner on
a few cores, and would take the interpreter's lock from the loop (and /health) for longer."""


@dataclass
class ServerState:
    """What every request shares: the engine, the settings, the one generation worker, the page."""

    engine: ChatEngine
    config: ServerConfig
    worker: Worker
    page: str
    preparing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PREPARING, thread_name_prefix="chatkit-prepare")
    )

    async def off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` on one of `PREPARING` threads: work that grows with a request (parsing,
        tokenizing, retrieval), kept off the event loop so that it goes on serving."""
        return await asyncio.get_running_loop().run_in_executor(self.preparing, fn, *args)


# Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a needless hop here.


async def server_state(request: Request) -> ServerState:
    return request.app.state.chatkit


State = Annotated[ServerState, Depends(server_state)]


async def _engine(state: State) -> ChatEngine:
    return state.engine


async def _settings(state: State) -> ServerConfig:
    return state.config


async def _worker(state: State) -> Worker:
    return state.worker


async def _retrieval(state: State) -> ContextProvider | None:
    return state.config.context_provider


Engine = Annotated[ChatEngine, Depends(_engine)]
Settings = Annotated[ServerConfig, Depends(_settings)]
Generation = Annotated[Worker, Depends(_worker)]
Retrieval = Annotated[ContextProvider | None, Depends(_retrieval)]


async def require_api_key(request: Request, settings: Settings) -> None:
    """With an API key set, refuse (401) a request without `Authorization: Bearer KEY`; it runs
    before the body is read, so an unauthenticated client learns nothing about its request. Bytes
    are compared: `compare_digest` raises on non-ASCII text, which a header may well hold."""
    if settings.api_key is None:
        return
    # The header's own bytes (Starlette decodes headers as latin-1), so a UTF-8 key can match.
    scheme, _, key = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
    given, wanted = key.strip(), settings.api_key.encode()
    # An empty key never matches, whatever the configuration says (ServerConfig refuses one too).
    if scheme.lower() != b"bearer" or not given or not wanted or not secrets.compare_digest(given, wanted):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")


JSON_TYPES = ("application/json",)
"""What a POST body must be declared as. A cross-site page may send text/plain or a form without
asking the browser's leave (a "simple" request), but never application/json: the type is a guard."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused before it is parsed when it is not declared as JSON (415) or
    holds more than `limit` bytes (413): by its Content-Length, before a byte is read, else
    (chunked, or a client that lies) as soon as the bytes read pass the limit."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in JSON_TYPES:
        raise ApiError(415, "the body must be JSON, sent with Content-Type: application/json",
                       code="unsupported_media_type")  # fmt: skip
    too_big = ApiError(413, f"the body is larger than this server's limit of {limit} bytes",
                       code="request_too_large")  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:  # nobody will read the answer; a 400 keeps it out of the error log
        raise ApiError(400, "the client closed the connection before the body ended") from None
    return b"".join(chunks)


_Body = TypeVar("_Body", bound=BaseModel)


async def _parsed(request: Request, state: ServerState, model: type[_Body]) -> _Body:
    body = await read_body(request, state.config.max_body)
    return await state.off_loop(parse_body, body, model)


async def _chat_body(request: Request, state: State) -> ChatRequest:
    return await _parsed(request, state, ChatRequest)


async def _completion_body(request: Request, state: State) -> CompletionRequest:
    return await _parsed(request, state, CompletionRequest)


# Bodies are parsed by `parse_body`, not FastAPI: a size limit, and a 400 in OpenAI's shape.
ChatBody = Annotated[ChatRequest, Depends(_chat_body)]
CompletionBody = Annotated[CompletionRequest, Depends(_completion_body)]
