"""Probes (/health, /ready), metrics, and the ops and admin routes: limits, audit log, models."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from inferd.server.access import audit_fields
from inferd.server.errors import OpenAIError
from inferd.server.protocol import LimitsUpdate, ModelLoad
from inferd.server.state import state_of
from inferd.store.packed import is_packed
from inferd.store.trust import ModelTrustError, check_configured


# ---- anonymous ------------------------------------------------------------------------------
async def health(request: Request):
    return {"status": "ok", **state_of(request).build}


async def ready(request: Request):
    s = state_of(request)
    if s.ready:
        return {"status": "ready", "model": s.model_id}
    if s.fatal is not None:
        return JSONResponse({"status": "failed", "error": s.fatal}, status_code=503)
    body = {"status": "loading" if s.load_error is None else "failed", "error": s.load_error}
    return JSONResponse(body, status_code=503)


# ---- ops --------------------------------------------------------------------------------------
async def metrics(request: Request):
    return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _limits(request: Request) -> dict:
    lim = state_of(request).limiter
    return {"max_concurrent_per_key": lim.max_concurrent, "requests_per_minute_per_key": lim.per_minute}


async def get_limits(request: Request):
    await state_of(request).audit_record(**audit_fields(request, 200))
    return _limits(request)


async def put_limits(body: LimitsUpdate, request: Request):
    lim = state_of(request).limiter
    if body.max_concurrent_per_key is not None:
        lim.max_concurrent = body.max_concurrent_per_key
    if body.requests_per_minute_per_key is not None:
        lim.per_minute = body.requests_per_minute_per_key
    await state_of(request).audit_record(**audit_fields(request, 200), change=body.model_dump(exclude_none=True))
    return _limits(request)


async def get_logs(request: Request, limit: int = 100, before: str | None = None):
    """A page of the audit log, newest first, and the cursor (`next_before`) of the next one."""
    s = state_of(request)
    await s.audit_record(**audit_fields(request, 200))
    try:  # file I/O, off the event loop; a page reads only its own records
        return await run_in_threadpool(s.audit.read_page, max(1, min(limit, 1000)), before)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="before") from None


# ---- admin: the model -----------------------------------------------------------------------
async def get_models(request: Request):
    s = state_of(request)
    await s.audit_record(**audit_fields(request, 200))
    return {"model": s.model_id, "path": s.model_path, "ready": s.ready, "loading": s.loading, "load_error": s.load_error}


async def load(body: ModelLoad, request: Request):
    s = state_of(request)
    if s.loading:
        raise OpenAIError(409, "a model load is already in progress: wait for GET /admin/models", code="load_in_progress")
    try:
        is_model = (Path(body.model) / "config.json").exists() or is_packed(body.model)
    except OSError as e:  # a name too long for the filesystem, a path through a file...
        raise OpenAIError(400, f"model path {body.model[:100]!r} cannot be opened: {e.strerror}", param="model") from None
    if not is_model:
        raise OpenAIError(400, f"{body.model} is not a model directory (no config.json) or packed model", param="model")
    try:  # the signature check reads the whole manifest: off the event loop
        await asyncio.to_thread(check_configured, s.cfg, body.model)
    except ModelTrustError as e:
        raise OpenAIError(400, str(e), param="model") from None
    await s.audit_record(**audit_fields(request, 202), change={"load": body.model})
    s.start_load(body.model, body.served_model_name)
    return {"status": "loading", "model": body.served_model_name or Path(body.model).name}


async def unload(request: Request):
    s = state_of(request)
    if s.engine is None or s.loading:
        raise OpenAIError(409, "no model is serving (or one is loading)", code="nothing_to_unload")
    await s.audit_record(**audit_fields(request, 200), change={"unload": s.model_id})
    s.unload()
    return {"status": "unloaded", "model": s.model_id}


def register(app: FastAPI) -> None:
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/admin/limits", get_limits, methods=["GET"])
    app.add_api_route("/admin/limits", put_limits, methods=["PUT"])
    app.add_api_route("/admin/logs", get_logs, methods=["GET"])
    app.add_api_route("/admin/models", get_models, methods=["GET"])
    app.add_api_route("/admin/models/load", load, methods=["POST"], status_code=202)
    app.add_api_route("/admin/models/unload", unload, methods=["POST"])
