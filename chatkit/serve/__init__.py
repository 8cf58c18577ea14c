"""The served chat: a web page at `/` and an OpenAI-compatible API, on the shared chat engine.

    python inference/serve.py --model outputs/demo/hf [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), `GET /v1/models`,
`GET /health` (no key: the name and the generation defaults, which the page reads). The model is
served under one name (`--model-name`, else `cli.served_name`); a request naming another gets a 404
`model_not_found`. One worker thread runs one generation at a time, in arrival order, so concurrent
clients each get their own, unmixed answer. A stream whose client goes away is cancelled.
Bad requests get a 4xx with an OpenAI-shaped `{"error": {"message": ...}}` body. Only Host headers
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
