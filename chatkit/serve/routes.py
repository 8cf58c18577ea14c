"""The routes: the OpenAI-compatible API under /v1 (API key required), the page and /health.

Each route checks its request completely (a 4xx before anything is queued), then hands one
generation to the worker and shapes its pieces with `respond`.
"""

import asyncio
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import HTMLResponse

from chatkit.chat import with_context
from chatkit.serve.protocol import (
    OPENAI_COMPLETION_DEFAULT,
    ApiError,
    generation_params,
    max_tokens,
    parse_stops,
    to_messages,
)
from chatkit.serve.responses import respond
from chatkit.serve.state import (
    ChatBody,
    CompletionBody,
    Engine,
    Generation,
    Retrieval,
    Settings,
    State,
    require_api_key,
)

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
"""OpenAI's API; every route here requires the API key when one is set."""

site = APIRouter()
"""The chat page and the health check: open, so a browser can load the page and ask for the key."""


@api.post("/chat/completions")
async def chat_completions(
    req: ChatBody, engine: Engine, settings: Settings, worker: Generation, retrieval: Retrieval
) -> Response:
    """A reply to the conversation, refused (400 context_length_exceeded) if it does not fit."""
    messages, stops = to_messages(req), parse_stops(req)
    if retrieval is not None:  # embedding + search: off the event loop
        messages = with_context(messages, await asyncio.to_thread(retrieval, messages))
    prompt_len = engine.prompt_length(messages)
    n = max_tokens(req.requested_tokens, settings.defaults.max_new_tokens, prompt_len, engine.context_length)
    params = generation_params(req, settings.defaults, n)
    job = worker.start(partial(engine.stream, messages, params, req.seed, stop=stops))
    return await respond(req, job, settings.model_name, chat=True)


@api.post("/completions")
async def completions(
    req: CompletionBody, engine: Engine, settings: Settings, worker: Generation
) -> Response:
    """A continuation of one raw text prompt (no chat template)."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: exactly one prompt per request", "prompt")
    prompt, stops = prompts[0], parse_stops(req)
    prompt_len = engine.text_length(prompt)
    if prompt_len == 0:
        raise ApiError(400, "prompt: must not be empty", "prompt")
    n = max_tokens(req.max_tokens, OPENAI_COMPLETION_DEFAULT, prompt_len, engine.context_length)
    params = generation_params(req, settings.defaults, n)
    job = worker.start(partial(engine.complete, prompt, params, req.seed, stop=stops))
    return await respond(req, job, settings.model_name, chat=False, head=prompt if req.echo else "")


@api.get("/models")
async def models(engine: Engine, settings: Settings) -> dict[str, Any]:
    """The one model served; `context_length` is an extension, for clients that trim their own chat."""
    card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "chatkit",
            "context_length": engine.context_length}  # fmt: skip
    return {"object": "list", "data": [card]}


@site.get("/health")
async def health(settings: Settings, worker: Generation) -> dict[str, Any]:
    """Liveness and load, without the key: for probes and for tests waiting on start-up."""
    return {"status": "ok", "model": settings.model_name, "waiting": worker.pending}


@site.get("/", response_class=HTMLResponse)
async def index(state: State) -> HTMLResponse:
    """The chat page; it talks to the API above like any other client."""
    return HTMLResponse(state.page)
