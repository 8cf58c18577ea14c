"""The OpenAI wire protocol as this server speaks it: request bodies, their checks, and errors.

Everything here turns a client's mistake into an `ApiError` (a 4xx with an OpenAI-shaped body)
before any generation starts, so a bad request never costs the worker a turn nor the client a 500.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatkit.chat import GenerationParams
from chatkit.conversation import Message

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds torch's generator takes (a 64-bit integer, signed or not); others would fail in the worker."""


class ApiError(Exception):
    """Answered as {"error": {...}} with this HTTP status (OpenAI's shape, so its clients raise
    the matching exception: 400 BadRequestError, 401 AuthenticationError, ...)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- request bodies (strict: a string where a number belongs is a 400, not a guess) --------------


class OpenAIRequest(BaseModel):
    """The fields chat and text completions share; unknown fields are ignored, as OpenAI's are."""

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
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (OpenAI sends one only when asked)."""
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]


class ChatRequest(OpenAIRequest):
    messages: list[_ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    @property
    def requested_tokens(self) -> int | None:
        """`max_completion_tokens` (OpenAI's newer name) wins over `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    echo: bool = False


_Body = TypeVar("_Body", bound=BaseModel)


def _validation_message(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    where = ".".join(str(x) for x in first["loc"]) or "body"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _bad_text(obj: Any) -> str | None:
    """The place of the first string (key or value) that is not Unicode text, or None. JSON's
    escapes can spell half of a surrogate pair, which no tokenizer or UTF-8 encoder takes; a walk
    with its own stack, as the object may be nested as deep as the parser allowed."""
    todo: list[tuple[Any, str]] = [(obj, "body")]
    while todo:
        item, where = todo.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return where
        elif isinstance(item, dict):
            todo.extend((k, where) for k in item)
            todo.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((v, f"{where}.{i}") for i, v in enumerate(item))
    return None


def parse_body(body: bytes, model: type[_Body]) -> _Body:
    """The body (JSON) as `model`, or a 400 naming the first problem: clearer than FastAPI's 422
    list, and in OpenAI's error shape. CPU-bound on a large body: call it off the event loop."""
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object")
    if (where := _bad_text(obj)) is not None:
        raise ApiError(400, f"{where.removeprefix('body.')}: not valid Unicode text (a lone surrogate)")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise ApiError(400, _validation_message(e)) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None


def check_model(req: OpenAIRequest, served: str) -> None:
    """A request naming a model this server does not serve gets OpenAI's 404 `model_not_found`, not an
    answer from another model than it asked for. An omitted `model` means the served one (curl users
    leave it out; OpenAI's clients always send it)."""
    if req.model is not None and req.model != served:
        raise ApiError(404, f"the model {req.model!r} does not exist here; this server serves {served!r}",
                       "model", "model_not_found")  # fmt: skip


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


def parse_stops(req: OpenAIRequest) -> list[str]:
    """The request's stop strings; OpenAI allows at most 4, and an empty one would stop at once."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
    return stops


def generation_params(req: OpenAIRequest, defaults: GenerationParams, max_tokens: int) -> GenerationParams:
    """The server's defaults with what this request sets; temperature 0 means greedy decoding."""
    p = replace(defaults, max_new_tokens=max_tokens)
    if req.temperature is not None:
        p.temperature, p.sample = req.temperature, req.temperature > 0
    if req.top_p is not None:
        p.top_p = req.top_p
    if req.top_k is not None:
        p.top_k = req.top_k
    return p


def _too_long(message: str) -> ApiError:
    # The web page reads this code to ask again without the oldest turns.
    return ApiError(400, message, "messages", "context_length_exceeded")


def max_tokens(requested: int | None, default: int, prompt_len: int, context: int) -> int:
    """How many tokens to generate: the request's, checked to fit the context with the prompt, or
    the default cut to the room left. Never trims the prompt: the client decides what to leave out."""
    room = context - prompt_len
    if requested is None:
        if room < 1:
            raise _too_long(f"the prompt ({prompt_len} tokens) fills the model's context of {context} tokens")
        return min(default, room)
    if not 1 <= requested <= context:
        raise ApiError(400, f"max_tokens: must be between 1 and {context}, got {requested}", "max_tokens")
    if requested > room:
        raise _too_long(
            f"the prompt ({prompt_len} tokens) plus max_tokens ({requested}) exceeds the model's "
            f"context of {context} tokens"
        )
    return requested
