"""`create_app`: one engine's server, assembled from the module-level routers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatkit.chat import ChatEngine
from chatkit.serve.guard import RequestGuard
from chatkit.serve.protocol import ApiError
from chatkit.serve.routes import api, site
from chatkit.serve.state import ServerConfig, ServerState
from chatkit.serve.worker import Worker


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At shutdown, let the generation thread end once its queued jobs are done."""
    yield
    app.state.chatkit.worker.close()


async def _api_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(_: Request, e: Exception) -> JSONResponse:
    """Starlette's own refusals (404, 405) in the API's error shape, too."""
    assert isinstance(e, HTTPException)
    err = ApiError(e.status_code, str(e.detail))
    return JSONResponse(err.body(), status_code=e.status_code, headers=e.headers)


async def _server_error(_: Request, e: Exception) -> JSONResponse:
    """A bug (never a client's mistake: those are 4xx) still answers in the API's error shape."""
    return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)


def create_app(engine: ChatEngine, config: ServerConfig) -> FastAPI:
    """The web page and the OpenAI-compatible API for `engine`; its generation thread starts now.

    No OpenAPI schema nor docs are served; every request passes `RequestGuard` (Host, Origin)."""
    app = FastAPI(title="chatkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    page = resources.files("chatkit.web").joinpath("index.html").read_text(encoding="utf-8")
    state = ServerState(engine, config, Worker(config.max_queue, config.max_batch), page)
    app.state.chatkit = state
    app.state.worker = state.worker
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(RequestGuard, rules=config.host_rules())
    app.include_router(api)
    app.include_router(site)
    return app
