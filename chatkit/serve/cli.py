"""`python inference/serve.py`: load a model and serve it with uvicorn (127.0.0.1 unless told)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chatkit.serve.app import create_app
from chatkit.serve.state import MAX_BODY, ServerConfig

_EPILOG = """\
Who may connect: requests must name this server in their Host header: localhost, 127.0.0.1 or
[::1], or the --host address, each with --port, or a name given with --allowed-host; any other Host
gets 421 (a DNS-rebinding page cannot read the API). Binding 0.0.0.0 or :: needs --allowed-host
naming what clients type (e.g. --allowed-host 192.168.1.5 --allowed-host chat.lan); '*' accepts any
Host, for use behind a proxy that checks it, or with --api-key. A POST whose Origin is not this
server gets 403, and API bodies must be sent as 'Content-Type: application/json' (else 415), so a
page on another site cannot make a browser run a generation. Bodies over --max-body get 413."""


def _size(text: str) -> int:
    """Bytes, with an optional k or m suffix (KiB, MiB): 1048576, 512k, 1m."""
    t = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or with k or m: 512k, 1m)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return n


EXPORT_FOLDER_NAMES = ("hf", "model")
"""Folder names that say what a folder is, not which model: tools/convert_to_hf.py's outputs/<run>/hf
and the base models' pretrained/<name>/model. The model is named by the folder above them."""


def served_name(model: str | Path) -> str:
    """The model id to serve a folder as, when --model-name does not say: its name, or for an export
    folder (EXPORT_FOLDER_NAMES) its parent's, so that every demo export is not served as "hf"."""
    folder = Path(model).resolve()
    if folder.name in EXPORT_FOLDER_NAMES and folder.parent.name:
        return folder.parent.name
    return folder.name


def _parser() -> argparse.ArgumentParser:
    from chatkit.bot import add_generation_args, add_loading_args, add_retrieval_args

    p = argparse.ArgumentParser(
        description="Serve a web chat and an OpenAI-compatible API for a model.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Hugging Face folder (e.g. outputs/demo/hf)")
    p.add_argument("--template", help="chat template (default: the one recorded in the model folder)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; 0.0.0.0 needs --allowed-host)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                   help="a name clients may use in the Host header besides localhost, 127.0.0.1, [::1] "
                        "and --host (any port unless given); repeatable; '*': any")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("CHATKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $CHATKIT_API_KEY, else none; "
                        "an empty key is an error)")  # fmt: skip
    p.add_argument("--model-name",
                   help="the model id the API reports and requests must name (default: the folder's name, "
                        "or its parent's for an export folder named hf or model: outputs/demo/hf -> demo)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 503 (64)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together, one forward per token for all (8; 1: one at a time)")  # fmt: skip
    p.add_argument("--max-body", type=_size, default=MAX_BODY, metavar="BYTES",
                   help="largest request body, in bytes or with k/m (KiB/MiB); larger ones get 413 (1m)")  # fmt: skip
    add_generation_args(p)
    add_loading_args(p)
    add_retrieval_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, check the server's settings (a one-line error and exit 2 before any
    model is loaded), load the engine (and retrieval), serve until interrupted."""
    from chatkit.bot import engine_from_args, params_from_args, retrieval_from_args

    p = _parser()
    args = p.parse_args(argv)
    name = args.model_name or served_name(args.model)
    try:
        config = ServerConfig(
            name,
            params_from_args(args),
            args.api_key,
            args.max_queue,
            max_batch=args.max_batch,
            max_body=args.max_body,
            host=args.host,
            port=args.port or None,  # 0: a port the system picks, unknown here
            allowed_hosts=tuple(args.allowed_host),
        )
    except ValueError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    engine = engine_from_args(p, args)
    config.context_provider = retrieval_from_args(p, args, engine, config.defaults)
    import uvicorn

    uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level="info")
