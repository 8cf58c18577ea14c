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
from chatkit.conversation import ConversationError, Message, parse_conversation

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


class _CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str | dict[str, Any] = "{}"
    """A JSON string, as OpenAI sends it (an object is taken too)."""


class _ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: _CalledFunction


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    """None only beside an assistant's tool_calls, as OpenAI sends it."""
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None
    """An assistant reply's reasoning, as this server (and vLLM, DeepSeek) returns it."""


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
"""OpenAI's rule for a function's name (it appears verbatim in prompts and in the calls)."""


class _FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments (an object)."""
    strict: bool | None = None
    """Accepted, not enforced: generation is not constrained to the schema."""


class _Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: _FunctionSchema


class _TemplateKwargs(BaseModel):
    """`chat_template_kwargs` (vLLM's and SGLang's extension); only `enable_thinking` is read."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enable_thinking: bool | None = None


class ChatRequest(OpenAIRequest):
    messages: list[_ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    """`none`, `auto`, `required` or {"type": "function", "function": {"name": ...}}; checked by
    `request_tools`, whose message says what is allowed (pydantic's for a union does not)."""
    chat_template_kwargs: _TemplateKwargs | None = None

    @property
    def requested_tokens(self) -> int | None:
        """`max_completion_tokens` (OpenAI's newer name) wins over `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def thinking(self) -> bool | None:
        """`chat_template_kwargs.enable_thinking`: False asks a reasoning template for no reasoning."""
        return self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None


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


_ROLE_FIELDS = {"assistant": ("tool_calls", "reasoning_content"), "tool": ("tool_call_id", "name")}
"""The fields beyond role and content a message of each role may carry (a user's `name` is ignored)."""


def _message_dict(m: _ChatMessage, i: int) -> dict[str, Any]:
    """One request message in chatkit's conversation shape (developer counts as system; text parts are
    joined), for `parse_conversation` to check as it checks training data."""
    role = "system" if m.role == "developer" else m.role
    if role == "system" and i != 0:
        raise ApiError(400, "a system message may only come first", f"messages.{i}.role")
    if m.content is None and not m.tool_calls:
        raise ApiError(400, "content: required (null only beside tool_calls)", f"messages.{i}.content")
    parts = m.content if isinstance(m.content, list) else [_TextPart(type="text", text=m.content or "")]
    d: dict[str, Any] = {"role": role, "content": "".join(p.text for p in parts)}
    for key in ("tool_calls", "tool_call_id", "reasoning_content"):
        if getattr(m, key) is not None and key not in _ROLE_FIELDS.get(role, ()):
            raise ApiError(400, f"{key}: not allowed in a {m.role} message", f"messages.{i}.{key}")
    if m.tool_calls:
        d["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
    if m.reasoning_content is not None:
        d["reasoning"] = m.reasoning_content
    if role == "tool":
        d |= {k: v for k in _ROLE_FIELDS["tool"] if (v := getattr(m, k)) is not None}
    return d


def to_messages(req: ChatRequest) -> list[Message]:
    """OpenAI messages -> chatkit messages: tool results (role `tool`), assistant `tool_calls` (their
    JSON `arguments` read into objects) and `reasoning_content` included."""
    obj = {"messages": [_message_dict(m, i) for i, m in enumerate(req.messages)]}
    try:
        out = list(parse_conversation(obj, "request").messages)
    except ConversationError as e:
        raise ApiError(400, str(e).removeprefix("request: "), "messages") from None
    if out[-1].role not in ("user", "tool"):
        raise ApiError(400, "the last message must be the user's (or a tool result)",
                       f"messages.{len(out) - 1}.role")  # fmt: skip
    return out


def request_tools(req: ChatRequest) -> list[dict[str, Any]]:
    """The tools the prompt shows (OpenAI's function schemas, unset fields left out), as `tool_choice`
    says, best effort (nothing constrains generation): `none` shows none (no tool list, and no call is
    read back); a named function is shown alone, the only one the model can call; `auto` (the default)
    and `required` show all, and a reply without a call is still answered as text. 400 for a choice
    naming no function given, `required` without tools, or two functions of one name."""
    tools = [
        {"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in req.tools or []
    ]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ApiError(400, f"tools: two functions are named {dup!r}", "tools")
    choice = req.tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) and choice.get("type") == "function" else None
        if not isinstance(name, str):
            named = '{"type": "function", "function": {"name": ...}}'
            raise ApiError(400, f"tool_choice: a named choice is {named}", "tool_choice")
        if name not in names:
            raise ApiError(400, f"tool_choice: no function named {name!r} in tools", "tool_choice")
        return [t for t in tools if t["function"]["name"] == name]
    if choice not in (None, "none", "auto", "required"):
        words = "'none', 'auto', 'required' or a named function"
        raise ApiError(400, f"tool_choice: must be {words}, got {choice!r}", "tool_choice")
    if choice == "required" and not tools:
        raise ApiError(400, "tool_choice: 'required' needs tools", "tool_choice")
    return [] if choice == "none" else tools


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
