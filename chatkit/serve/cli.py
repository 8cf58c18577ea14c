"""`python inference/serve.py`: load a model and serve it with uvicorn (127.0.0.1 unless told)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from chatkit.serve.app import create_app
from chatkit.serve.state import ServerConfig


def _parser() -> argparse.ArgumentParser:
    from chatkit.bot import add_generation_args, add_loading_args, add_retrieval_args

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
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, load the engine (and retrieval), serve until interrupted."""
    from chatkit.bot import engine_from_args, params_from_args, retrieval_from_args

    p = _parser()
    args = p.parse_args(argv)
    engine = engine_from_args(p, args)
    name = args.model_name or Path(args.model).resolve().name
    config = ServerConfig(
        name, params_from_args(args), args.api_key, args.max_queue, retrieval_from_args(p, args)
    )
    import uvicorn

    uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level="info")
