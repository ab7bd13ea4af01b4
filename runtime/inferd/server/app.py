"""The HTTP server, assembled: `create_app(config)` builds it; `inferd serve` runs it under
uvicorn. Each concern lives in its own module:

    errors         OpenAI-shaped errors and the exception handlers
    limits         per-key rate/concurrency limits (429) and the body size limit (413)
    access         the Bearer key against the role table; audit fields of the caller
    state          ServerState: the engine (model load, swap, unload), audit, keys, results
    generation     one request from admission to its end: checked, admitted, run, audited
    openai_format  OpenAI response bodies and server-sent events
    openai_routes  /v1 routes;  admin_routes: probes, /metrics, /admin
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from inferd.server import admin_routes, openai_routes
from inferd.server.access import authorize
from inferd.server.config import ServerConfig
from inferd.server.errors import install_error_handlers
from inferd.server.limits import BodyLimit
from inferd.server.state import ServerState


def create_app(cfg: ServerConfig, load_model: bool = True, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """`on_fatal`: see ServerState; without it a fatal error leaves the app answering 503."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state.inferd = ServerState(cfg, on_fatal=on_fatal)
        if load_model:
            state.start_load(at_start=True)
        yield
        state.close()

    app = FastAPI(
        title="inferd",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(authorize)],
    )
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    install_error_handlers(app)
    # Routes are added to the app itself, not included from an APIRouter: the app-wide `authorize`
    # dependency and the route templates the role table is keyed by then apply to every one.
    admin_routes.register(app)
    openai_routes.register(app)
    return app
