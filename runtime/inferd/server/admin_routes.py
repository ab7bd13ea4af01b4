"""Probes (/health, /ready), metrics, and the ops and admin routes: limits, audit log, models."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from inferd.engine.async_engine import EngineDeadError, SwapInProgress, WeightSwapError, WeightSwapRolledBack
from inferd.server.access import audit_fields
from inferd.server.build_info import build_info
from inferd.server.errors import OpenAIError
from inferd.server.protocol import LimitsUpdate, ModelLoad, ModelSwap
from inferd.server.state import state_of
from inferd.store.packed import is_packed
from inferd.store.trust import ModelTrustError, check_configured, read_public_key


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


def _store_path(cfg, name: str) -> Path:
    """The package `name` names under the store (model_store_dir): 400 for one outside it."""
    store = Path(cfg.model_store_dir or Path(cfg.model).parent).resolve()
    try:
        path = (store / name).resolve()
        is_dir = path.is_dir()
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the filesystem...
        raise OpenAIError(400, f"model {name[:100]!r} cannot be opened: {e}", param="model") from None
    if path == store or not path.is_relative_to(store):
        raise OpenAIError(400, f"model {name[:100]!r} must name a package under the model store {store}", param="model")
    if not is_dir:
        raise OpenAIError(400, f"{path} does not exist: copy the package into the model store {store} first", param="model")
    return path


async def swap(body: ModelSwap, request: Request):
    """Serve another package's weights in place (same architecture and shape): the process keeps
    its compiled code and graphs, and the pause is a drain and a copy (engine/weight_swap.py)."""
    s = state_of(request)
    engine = s.engine
    if engine is None or s.loading or not s.ready:
        raise OpenAIError(409, "no model is serving (or one is loading): nothing to swap", code="nothing_to_swap")
    path = _store_path(s.cfg, body.model)
    old = {"model_version": s.build["model_version"], "path": s.model_path}
    try:  # the trust rule, then staging (minutes for a large model): off the event loop
        await asyncio.to_thread(check_configured, s.cfg, path)
        public = read_public_key(s.cfg.model_public_key_file)
        report = await asyncio.to_thread(engine.swap_weights, str(path), body.drain_timeout_s, public)
    except SwapInProgress as e:
        raise OpenAIError(409, str(e), code="swap_in_progress") from None
    except WeightSwapRolledBack as e:
        await _swap_failed(s, request, 500, path, str(e), "rolled_back")
        raise OpenAIError(500, str(e), "server_error", code="swap_rolled_back") from None
    except EngineDeadError as e:
        await _swap_failed(s, request, 503, path, str(e), "rolled_back")
        raise OpenAIError(503, str(e), "server_error", code="engine_failed") from None
    except (WeightSwapError, ModelTrustError, ValueError, OSError) as e:  # refused: nothing changed
        await _swap_failed(s, request, 400, path, f"{type(e).__name__}: {e}", "refused")
        raise OpenAIError(400, f"swap refused, {s.model_path} still serves: {e}", param="model", code="swap_refused") from None
    s.model_path = str(path)
    s.build = build_info(path)
    s.metrics.set_build_info(s.model_id, s.build)
    s.metrics.swaps.labels("ok").inc()
    s.metrics.swap_pause.set(report.paused_s)
    result = {"old": old, "new": {"model_version": s.build["model_version"], "path": str(path)}, **_timings(report)}
    await s.audit_record(**audit_fields(request, 200), change={"swap": result})
    return {"status": "swapped", "model": s.model_id, **result}


def _timings(report) -> dict:
    return {
        "pause_s": round(report.paused_s, 4),
        "token_gap_s": None if report.token_gap_s is None else round(report.token_gap_s, 4),
        "drain_s": round(report.drain_s, 4),
        "copy_s": round(report.copy_s, 4),
        "staging_s": round(report.staging_s, 4),
        "staged_bytes": report.staged_bytes,
        "preempted": report.preempted,
    }


async def _swap_failed(s, request: Request, status: int, path: Path, error: str, result: str) -> None:
    s.metrics.swaps.labels(result).inc()
    await s.audit_record(**audit_fields(request, status), change={"swap": str(path), "error": error[:500]})


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
    app.add_api_route("/admin/model/swap", swap, methods=["POST"])
