"""The server's state and the FastAPI dependencies that hand it to the routes.

`create_app` builds one `ServerState` and keeps it on `app.state.chatkit`; the routes never close
over it or reach for a global, so two apps in one process (tests, benchmarks) stay apart, and each
route says in its signature exactly what it uses.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from chatkit.chat import ChatEngine, ContextProvider, GenerationParams
from chatkit.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse_body
from chatkit.serve.worker import Worker


@dataclass
class ServerConfig:
    model_name: str
    defaults: GenerationParams
    api_key: str | None = None
    max_queue: int = 64
    context_provider: ContextProvider | None = None
    """Retrieval: passages for the newest user turn, added to that request's prompt only."""


@dataclass
class ServerState:
    """What every request shares: the engine, the settings, the one generation worker, the page."""

    engine: ChatEngine
    config: ServerConfig
    worker: Worker
    page: str


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
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    given, wanted = key.strip().encode(), settings.api_key.encode()
    if scheme.lower() != "bearer" or not secrets.compare_digest(given, wanted):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")


async def _chat_body(request: Request) -> ChatRequest:
    return parse_body(await request.body(), ChatRequest)


async def _completion_body(request: Request) -> CompletionRequest:
    return parse_body(await request.body(), CompletionRequest)


# Bodies are parsed by `parse_body`, not FastAPI: any Content-Type, and a 400 in OpenAI's shape.
ChatBody = Annotated[ChatRequest, Depends(_chat_body)]
CompletionBody = Annotated[CompletionRequest, Depends(_completion_body)]
