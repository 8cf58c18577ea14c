"""The served chat: a web page at `/` and an OpenAI-compatible API, on the shared chat engine.

    python inference/serve.py --model outputs/demo/hf [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), `GET /v1/models`,
`GET /health` (no key: the name and the generation defaults, which the page reads). The model is
served under one name (`--model-name`, else `cli.served_name`); a request naming another gets a 404
`model_not_found`. One worker thread runs one generation at a time, in arrival order, so concurrent
clients each get their own, unmixed answer. A stream whose client goes away is cancelled.
Bad requests get a 4xx with an OpenAI-shaped `{"error": {"message": ...}}` body.

Tool use, in OpenAI's shapes, for a template with a tool format (llama3, qwen3, mistral, or `hf` whose
Jinja writes one; any other given `tools` gets a 400 naming it): `tools` (function schemas, checked),
`tool_choice` (`none`: no tools in the prompt and no call read back; a named function: only it is
shown; `auto` and `required`: all are shown; nothing forces a call, so a reply without one is still
answered as text), messages of role `tool`, assistant messages with `tool_calls` and
`reasoning_content` (dropped for a template with no place for reasoning). Answers carry `tool_calls`
(ids `call_...`, or the model's own where its format writes one: Mistral's) with `finish_reason:
"tool_calls"`, and `reasoning_content`; streamed, reasoning comes as `delta.reasoning_content`, text
that may start a call is held back, and each call comes once the reply ends (its index, id, type and
name, then its arguments). `chat_template_kwargs: {"enable_thinking": false}` (vLLM's extension) asks
a reasoning template (qwen3) for a reply without reasoning. Only Host headers
naming this server are answered, cross-site POSTs are refused, bodies must be JSON and at most
`ServerConfig.max_body` bytes, and parsing and tokenizing happen off the event loop.

The parts: `protocol` (request bodies, their checks, `ApiError`), `worker` (the generation thread),
`responses` (JSON and server-sent answers), `guard` (the Host and Origin checks), `state`
(`ServerConfig`, the shared state and the FastAPI dependencies that hand it to routes, check the API
key and read bodies), `routes` (the routers), `app` (`create_app`) and `cli` (`main`).
"""

from chatkit.serve.app import create_app
from chatkit.serve.cli import main
from chatkit.serve.protocol import ApiError, ChatRequest, CompletionRequest, to_messages
from chatkit.serve.state import ServerConfig, ServerState
from chatkit.serve.worker import Job, Worker

__all__ = [
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "Job",
    "ServerConfig",
    "ServerState",
    "Worker",
    "create_app",
    "main",
    "to_messages",
]
