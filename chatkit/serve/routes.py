"""The routes: the OpenAI-compatible API under /v1 (API key required), the page and /health.

Each route checks its request completely (a 4xx before anything is queued; parsing, retrieval and
tokenizing on the `ServerState.off_loop` threads, so the event loop goes on serving), then hands one
generation to the worker and shapes its pieces with `respond`.
"""

from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import HTMLResponse

from chatkit.chat import ChatEngine, ContextProvider, with_context
from chatkit.conversation import Message
from chatkit.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_model,
    generation_params,
    max_tokens,
    parse_stops,
    request_tools,
    to_messages,
)
from chatkit.serve.responses import respond
from chatkit.serve.state import (
    ChatBody,
    CompletionBody,
    Engine,
    Generation,
    Retrieval,
    ServerConfig,
    Settings,
    State,
    require_api_key,
)
from chatkit.serve.worker import Run
from chatkit.templates.replies import ReplyStream

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
"""OpenAI's API; every route here requires the API key when one is set."""

site = APIRouter()
"""The chat page and the health check: open, so a browser can load the page and ask for the key."""


def _without_unshown_reasoning(engine: ChatEngine, messages: list[Message]) -> list[Message]:
    """Past replies' `reasoning_content` dropped where the template has no place for it (Llama 3.1,
    Mistral): clients send replies back as they got them, and the model never sees old reasoning in
    those formats anyway (Qwen3's own template drops all but the latest)."""
    if engine.template.reply_format.think is not None:
        return messages
    return [replace(m, reasoning=None) for m in messages]


def _chat_job(
    req: ChatRequest, engine: ChatEngine, settings: ServerConfig, retrieval: ContextProvider | None
) -> tuple[Run, ReplyStream]:
    """The checked generation for a chat request, and the reader of its reply (reasoning, tool calls).
    Retrieval (embedding, search) and measuring the prompt (tokenizing it) cost CPU in proportion to
    the request: called off the event loop."""
    check_model(req, settings.model_name)
    messages, stops = _without_unshown_reasoning(engine, to_messages(req)), parse_stops(req)
    tools = request_tools(req) or None
    if retrieval is not None:
        messages = with_context(messages, retrieval(messages))
    try:  # the template refuses what it has no format for (tools, tool results), naming itself
        prompt_len = engine.prompt_length(messages, tools=tools, thinking=req.thinking)
    except ValueError as e:
        raise ApiError(
            400, str(e), "tools" if tools and "tool definitions" in str(e) else "messages"
        ) from None
    n = max_tokens(req.requested_tokens, settings.defaults.max_new_tokens, prompt_len, engine.context_length)
    params = generation_params(req, settings.defaults, n)
    run = partial(engine.stream, messages, params, req.seed, stop=stops, tools=tools, thinking=req.thinking)
    return run, ReplyStream(engine.template.reply_format, tools=tools is not None)


def _completion_job(req: CompletionRequest, engine: ChatEngine, settings: ServerConfig) -> tuple[Run, str]:
    """The checked generation for a text completion and its prompt (off the event loop, as `_chat_job`).
    An omitted `max_tokens` is the server's default, as for chat (OpenAI's own default here is 16)."""
    check_model(req, settings.model_name)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: exactly one prompt per request", "prompt")
    prompt, stops = prompts[0], parse_stops(req)
    prompt_len = engine.text_length(prompt)
    if prompt_len == 0:
        raise ApiError(400, "prompt: must not be empty", "prompt")
    n = max_tokens(req.max_tokens, settings.defaults.max_new_tokens, prompt_len, engine.context_length)
    params = generation_params(req, settings.defaults, n)
    return partial(engine.complete, prompt, params, req.seed, stop=stops), prompt


@api.post("/chat/completions")
async def chat_completions(
    req: ChatBody, state: State, engine: Engine, settings: Settings, worker: Generation, retrieval: Retrieval
) -> Response:
    """A reply to the conversation, refused (400 context_length_exceeded) if it does not fit."""
    run, reader = await state.off_loop(_chat_job, req, engine, settings, retrieval)
    job = worker.start(run)
    return await respond(req, job, settings.model_name, chat=True, reader=reader)


@api.post("/completions")
async def completions(
    req: CompletionBody, state: State, engine: Engine, settings: Settings, worker: Generation
) -> Response:
    """A continuation of one raw text prompt (no chat template)."""
    run, prompt = await state.off_loop(_completion_job, req, engine, settings)
    job = worker.start(run)
    return await respond(req, job, settings.model_name, chat=False, head=prompt if req.echo else "")


@api.get("/models")
async def models(engine: Engine, settings: Settings) -> dict[str, Any]:
    """The one model served; `context_length` is an extension, for clients that trim their own chat."""
    card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "chatkit",
            "context_length": engine.context_length}  # fmt: skip
    return {"object": "list", "data": [card]}


@site.get("/health")
async def health(settings: Settings, worker: Generation) -> dict[str, Any]:
    """Liveness and load, without the key: for probes and for tests waiting on start-up. The page
    reads the model's name and the generation defaults here, before it has any API key."""
    d = settings.defaults
    defaults = {"max_tokens": d.max_new_tokens, "temperature": d.temperature if d.sample else 0.0,
                "top_p": d.top_p, "top_k": d.top_k}  # fmt: skip
    return {"status": "ok", "model": settings.model_name, "waiting": worker.pending, "defaults": defaults}


@site.get("/", response_class=HTMLResponse)
async def index(state: State) -> HTMLResponse:
    """The chat page; it talks to the API above like any other client."""
    return HTMLResponse(state.page)
