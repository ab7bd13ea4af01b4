"""The HTTP server: OpenAI-compatible routes behind the role table, audit log, result store and
metrics. `create_app(config)` builds it; `inferd serve` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferd.config import EngineConfig
from inferd.engine.async_engine import AsyncLLMEngine, EngineDeadError
from inferd.engine.llm_engine import LLMEngine
from inferd.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams
from inferd.server.audit import AuditFullError, AuditLog
from inferd.server.auth import ANONYMOUS, ROLE_TABLE, ApiKey, KeyStore, digest
from inferd.server.build_info import build_info
from inferd.server.config import ServerConfig
from inferd.server.metrics import Metrics
from inferd.server.protocol import ChatCompletionRequest, CompletionRequest, LimitsUpdate, ModelLoad
from inferd.server.results import ResultStore

log = logging.getLogger("inferd.server")
NOT_AUDITED = {"/health", "/ready", "/metrics"}
# The route label of every path no route matches. Labels are route templates, never raw paths: a
# raw path put other keys' result ids (and any byte a client sent) into /metrics, and 2,000 random
# paths grew it from 13 KB to 1.1 MB (issue 24).
UNMATCHED_ROUTE = "unmatched"


def route_template(request: Request) -> str:
    """The matched route's path template (`/v1/results/{result_id}`), or UNMATCHED_ROUTE."""
    return getattr(request.scope.get("route"), "path", UNMATCHED_ROUTE)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Principal:
    key_id: str
    name: str
    role: str


@dataclass
class Refusal:
    reason: str  # "rate" or "concurrency": the rate_limited metric's label
    retry_after_s: int  # the 429's Retry-After


class Limiter:
    """Per-key concurrency and requests-per-minute limits (429 beyond them)."""

    WINDOW_S = 60
    # A concurrency slot frees when one of the key's requests ends: there is no window to wait out.
    CONCURRENCY_RETRY_S = 1

    def __init__(self, max_concurrent: int, per_minute: int):
        self.max_concurrent, self.per_minute = max_concurrent, per_minute
        self.active: dict[str, int] = collections.Counter()
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def acquire(self, key_id: str) -> Refusal | None:
        now = time.monotonic()
        window = self.recent[key_id]
        while window and now - window[0] > self.WINDOW_S:
            window.popleft()
        if len(window) >= self.per_minute:
            # The oldest requests leave the window first; the next slot opens when the one
            # `per_minute` places back does (per_minute may have been lowered below len(window)).
            opens = window[len(window) - self.per_minute] + self.WINDOW_S
            return Refusal("rate", max(1, math.ceil(opens - now)))
        if self.active[key_id] >= self.max_concurrent:
            return Refusal("concurrency", self.CONCURRENCY_RETRY_S)
        window.append(now)
        self.active[key_id] += 1
        return None

    def release(self, key_id: str) -> None:
        self.active[key_id] -= 1


class BodyLimit:
    """Refuse request bodies over the limit with 413, whether or not Content-Length is sent.

    A body without Content-Length (Transfer-Encoding: chunked) is read here, up to the limit,
    before the app sees it: refusing it from inside the app's receive() instead ended as FastAPI's
    400 "error parsing the body" (issue 24)."""

    DRAIN_LIMIT = 64 << 20

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) <= self.limit:  # the HTTP server holds the body to its declared length
                return await self.app(scope, receive, send)
            # Read (and drop) a moderately oversized body so that the client, still sending,
            # gets to see the 413; past DRAIN_LIMIT the connection is simply closed.
            if int(length) <= self.DRAIN_LIMIT:
                await self._drain(receive, 0)
            return await self._refuse(send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away before its body was complete
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            more = msg.get("more_body", False)
            if seen > self.limit:
                if more:
                    await self._drain(receive, seen)
                return await self._refuse(send)
            if not more:
                break
        replayed = False

        async def buffered_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, for the routes that watch for it
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, buffered_receive, send)

    async def _drain(self, receive, seen: int) -> None:
        while seen <= self.DRAIN_LIMIT:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                return
            seen += len(msg.get("body", b""))

    async def _refuse(self, send):
        body = json.dumps(
            error_body(f"request body larger than {self.limit} bytes: send a smaller request", "invalid_request_error")
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class ServerState:
    """What the routes share. `on_fatal(reason)` is called once when the server can no longer
    serve and must not look alive: the start-up model load failed, or the serving engine died.
    `inferd serve` stops uvicorn from it and exits 1, so that systemd (Restart=on-failure)
    restarts the service and its start limit, not a 503 that never ends, reports a bad model."""

    def __init__(self, cfg: ServerConfig, engine: AsyncLLMEngine | None = None, on_fatal: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.on_fatal = on_fatal
        self.fatal: str | None = None
        self.metrics = Metrics()
        self.keys = KeyStore(cfg.keys_path)
        self.audit = AuditLog(cfg.audit_path, cfg.audit_ring_size, cfg.audit_full_timeout_s)
        cfg.results_path.mkdir(parents=True, exist_ok=True)
        self.results = ResultStore(str(cfg.results_path), cfg.results_retention_hours * 3600)
        self.limiter = Limiter(cfg.limits.max_concurrent_per_key, cfg.limits.requests_per_minute_per_key)
        self.engine = engine
        self.ready = False
        self.load_error: str | None = None
        self.loading = False
        self.model_id, self.model_path = cfg.model_id, cfg.model
        self.build = build_info(cfg.model, cfg.model_version)
        self.started = int(time.time())

    def load_model(self, path: str | None = None, name: str | None = None, at_start: bool = False) -> None:
        """Load a model and start serving it. With a model already serving this is a swap: the new
        one loads beside it, takes new requests once warm, and the old one finishes its in-flight
        requests before it is shut down. A failed load leaves the old model serving; a failed load
        at start-up (`at_start`) is fatal: the process has nothing to serve."""
        cfg = self.cfg
        path = path or cfg.model
        name = name or (cfg.model_id if path == cfg.model else Path(path).name)
        self.metrics.load_attempts.inc()
        self.loading = True
        try:
            engine_cfg = EngineConfig(
                model=path,
                device=cfg.device,
                dtype=cfg.dtype,
                quantization=cfg.quantization,
                kv_cache_dtype=cfg.kv_cache_dtype,
                max_model_len=cfg.max_model_len,
                max_num_seqs=cfg.max_num_seqs,
                kv_cache_fraction=cfg.kv_cache_fraction,
                model_key_file=cfg.model_key_file,
            )
            engine = LLMEngine(engine_cfg)
            if engine.tokenizer is None:
                raise ValueError(f"{path} has no tokenizer.json: the server needs one")
            engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
            old, self.engine = self.engine, AsyncLLMEngine(engine, on_error=self.engine_failed)
            self.model_id, self.model_path = name, path
            self.build = build_info(path, cfg.model_version if path == cfg.model else None)
            self.metrics.set_build_info(name, self.build)
            self.ready = True
            self.load_error = None
            self.metrics.ready.set(1)
            log.info("model ready", extra={"model": name, "path": path})
            if old is not None:
                self.retire(old)
        except Exception as e:
            self.metrics.load_failures.inc()
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", self.load_error)
            if at_start:
                self.die(f"the model failed to load at start-up: {self.load_error}")
        finally:
            self.loading = False

    def engine_failed(self, engine: AsyncLLMEngine, error: BaseException) -> None:
        """Called from a dying engine's thread. Only the serving engine's death is fatal: one being
        retired after a swap has no new requests to fail."""
        if engine is not self.engine:
            log.error("a retired engine failed: %s: %s", type(error).__name__, error)
            return
        self.die(f"the engine failed: {type(error).__name__}: {error}")

    def die(self, reason: str) -> None:
        """Stop looking alive (/ready 503, model_ready 0) and ask the process to exit."""
        if self.fatal is not None:
            return
        self.fatal = reason
        self.ready = False
        self.metrics.ready.set(0)
        log.critical("%s: the server stops and exits 1 so that it is restarted", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def retire(self, engine: AsyncLLMEngine) -> None:
        """Shut an engine down once its in-flight requests are done (or the shutdown timeout passed)."""
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        while engine.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.shutdown()

    async def audit_record(self, **record) -> None:
        """Queue a record and wait until it is durable; raises OpenAIError(503) otherwise."""
        record.setdefault("ts", time.time())
        try:
            fut = self.audit.submit(record)
            await asyncio.wrap_future(fut)
        except AuditFullError as e:
            raise OpenAIError(503, f"request not served: {e}", "server_error", code="audit_unavailable") from None
        finally:
            self.metrics.audit_depth.set(self.audit.depth)
            self.metrics.audit_records.set(self.audit.written)
            self.metrics.audit_dropped.set(self.audit.dropped)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.audit.close()
        self.results.close()


def create_app(cfg: ServerConfig, load_model: bool = True, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """`on_fatal`: see ServerState; without it a fatal error leaves the app answering 503."""
    state_holder: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(cfg, on_fatal=on_fatal)
        state_holder["s"] = app.state.inferd = state
        if load_model:
            threading.Thread(target=state.load_model, kwargs={"at_start": True}, name="inferd-load", daemon=True).start()
        yield
        state.close()

    async def authorize(request: Request) -> Principal | None:
        state: ServerState = request.app.state.inferd
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        allowed = ROLE_TABLE.get((request.method, path))
        if allowed is None:
            raise OpenAIError(403, f"{request.method} {path} is not in the role table: access denied", "permission_error")
        if ANONYMOUS in allowed:
            return None
        if any(q.lower() in ("api_key", "key", "token", "access_token") for q in request.query_params):
            raise OpenAIError(400, "API keys are accepted only in the 'Authorization: Bearer' header, never in the URL")
        header = request.headers.get("authorization")
        if not header:
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise OpenAIError(401, "malformed Authorization header: expected 'Bearer <key>'", "authentication_error")
        if path == "/metrics" and cfg.metrics_bearer_token_sha256:
            if hmac.compare_digest(digest(token), cfg.metrics_bearer_token_sha256):
                return Principal("prometheus", "prometheus", "ops")
        state.keys.reload()
        key: ApiKey | None = state.keys.lookup(token)
        if key is None:
            raise OpenAIError(401, "invalid or revoked API key", "authentication_error")
        if key.role not in allowed:
            raise OpenAIError(403, f"role '{key.role}' may not call {request.method} {path}", "permission_error")
        principal = Principal(key.key_id, key.name, key.role)
        request.state.principal = principal
        return principal

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

    def st(request: Request) -> ServerState:
        return request.app.state.inferd

    async def audit_failure(request: Request, status: int, message: str) -> None:
        path = route_template(request)
        if path in NOT_AUDITED:
            return
        p = getattr(request.state, "principal", None)
        try:
            await st(request).audit_record(
                route=path,
                method=request.method,
                status=status,
                key_id=getattr(p, "key_id", None),
                key_name=getattr(p, "name", None),
                role=getattr(p, "role", None),
                error=message[:200],
            )
        except OpenAIError:
            pass  # the error response goes out anyway; the drop is counted

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError):
        st(request).metrics.requests.labels(route_template(request), str(exc.status)).inc()
        await audit_failure(request, exc.status, exc.message)
        body = error_body(exc.message, exc.type, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON (or not UTF-8)"
        else:
            msg = f"{loc or 'body'}: {first.get('msg', 'invalid value')}"
        st(request).metrics.requests.labels(route_template(request), "400").inc()
        await audit_failure(request, 400, msg)
        return JSONResponse(error_body(msg, "invalid_request_error", loc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid JSON (or not UTF-8)"
        st(request).metrics.requests.labels(route_template(request), str(exc.status_code)).inc()
        if exc.status_code < 500:
            await audit_failure(request, exc.status_code, message)
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code)

    # ---- anonymous --------------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request):
        return {"status": "ok", **st(request).build}

    @app.get("/ready")
    async def ready(request: Request):
        s = st(request)
        if s.ready:
            return {"status": "ready", "model": s.model_id}
        if s.fatal is not None:
            return JSONResponse({"status": "failed", "error": s.fatal}, status_code=503)
        body = {"status": "loading" if s.load_error is None else "failed", "error": s.load_error}
        return JSONResponse(body, status_code=503)

    # ---- users ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        return {
            "object": "list",
            "data": [
                {
                    "id": st(request).model_id,
                    "object": "model",
                    "created": st(request).started,
                    "owned_by": "inferd",
                    **st(request).build,
                }
            ],
        }

    @app.get("/openapi.json")
    async def openapi(request: Request):
        return request.app.openapi()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        s = engine_state(request, body.model)
        tok = s.engine.engine.tokenizer
        try:
            text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except Exception as e:
            raise OpenAIError(400, f"messages could not be rendered with the model's chat template: {e}") from None
        prompt_ids = tok.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await generate(request, body, prompt_ids, max_tokens, chat=True, logprobs=body.logprobs, prompt_text=text)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        s = engine_state(request, body.model)
        if isinstance(body.prompt, str):
            prompt_ids, text = s.engine.engine.tokenizer.encode(body.prompt), body.prompt
        else:
            prompt_ids, text = list(body.prompt), None
        return await generate(
            request, body, prompt_ids, body.max_tokens, chat=False, logprobs=bool(body.logprobs), prompt_text=text
        )

    @app.get("/v1/results/{result_id}")
    async def get_result(result_id: str, request: Request):
        s = st(request)
        found = s.results.get(result_id, request.state.principal.key_id)
        if found is None:  # another key's result looks exactly like a missing one
            raise OpenAIError(404, f"no result {result_id!r} for this key", code="result_not_found")
        await s.audit_record(**audit_fields(request, 200))
        return found

    # ---- ops / admin ------------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics(request: Request):
        s = st(request)
        m = s.metrics
        if s.engine is not None:
            eng = s.engine.engine
            m.kv_usage.set(eng.block_manager.usage())
            m.running.set(len(eng.scheduler.running))
            m.waiting.set(len(eng.scheduler.waiting))
            m.prefix_queries.set(eng.block_manager.prefix_queries)
            m.prefix_hits.set(eng.block_manager.prefix_hits)
        m.audit_depth.set(s.audit.depth)
        m.audit_records.set(s.audit.written)
        m.audit_dropped.set(s.audit.dropped)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/limits")
    async def get_limits(request: Request):
        lim = st(request).limiter
        await st(request).audit_record(**audit_fields(request, 200))
        return {"max_concurrent_per_key": lim.max_concurrent, "requests_per_minute_per_key": lim.per_minute}

    @app.put("/admin/limits")
    async def put_limits(body: LimitsUpdate, request: Request):
        lim = st(request).limiter
        if body.max_concurrent_per_key is not None:
            lim.max_concurrent = body.max_concurrent_per_key
        if body.requests_per_minute_per_key is not None:
            lim.per_minute = body.requests_per_minute_per_key
        await st(request).audit_record(**audit_fields(request, 200), change=body.model_dump(exclude_none=True))
        return {"max_concurrent_per_key": lim.max_concurrent, "requests_per_minute_per_key": lim.per_minute}

    @app.get("/admin/logs")
    async def get_logs(request: Request, limit: int = 100):
        from inferd.server.audit import read_records

        await st(request).audit_record(**audit_fields(request, 200))
        return {"records": read_records(cfg.audit_path)[-max(1, min(limit, 1000)) :]}

    @app.get("/admin/models")
    async def get_models(request: Request):
        s = st(request)
        await s.audit_record(**audit_fields(request, 200))
        return {"model": s.model_id, "path": s.model_path, "ready": s.ready, "loading": s.loading, "load_error": s.load_error}

    @app.post("/admin/models/load", status_code=202)
    async def load(body: ModelLoad, request: Request):
        s = st(request)
        if s.loading:
            raise OpenAIError(409, "a model load is already in progress: wait for GET /admin/models", code="load_in_progress")
        if not (Path(body.model) / "config.json").exists():
            raise OpenAIError(400, f"{body.model} is not a model directory (no config.json)", param="model")
        await s.audit_record(**audit_fields(request, 202), change={"load": body.model})
        s.loading = True
        threading.Thread(target=s.load_model, args=(body.model, body.served_model_name), daemon=True).start()
        return {"status": "loading", "model": body.served_model_name or Path(body.model).name}

    @app.post("/admin/models/unload")
    async def unload(request: Request):
        s = st(request)
        if s.engine is None or s.loading:
            raise OpenAIError(409, "no model is serving (or one is loading)", code="nothing_to_unload")
        await s.audit_record(**audit_fields(request, 200), change={"unload": s.model_id})
        old, s.engine, s.ready = s.engine, None, False
        s.metrics.ready.set(0)
        threading.Thread(target=s.retire, args=(old,), daemon=True).start()
        return {"status": "unloaded", "model": s.model_id}

    # ---- helpers ----------------------------------------------------------------------------
    def engine_state(request: Request, model: str) -> ServerState:
        s = st(request)
        if model != s.model_id:
            raise OpenAIError(404, f"model {model!r} does not exist: this server serves {s.model_id!r}", code="model_not_found")
        if s.fatal is not None:
            raise OpenAIError(503, f"{s.fatal}: the server is restarting", "server_error", code="engine_failed")
        if not s.ready or s.engine is None:
            raise OpenAIError(503, "the model is not loaded yet: retry when GET /ready answers 200", "server_error")
        return s

    def audit_fields(request: Request, status: int) -> dict:
        p = request.state.principal
        return {
            "route": request.scope["route"].path,
            "method": request.method,
            "status": status,
            "key_id": p.key_id,
            "key_name": p.name,
            "role": p.role,
        }

    async def generate(request, body, prompt_ids, max_tokens, chat: bool, logprobs: bool, prompt_text):
        s = st(request)
        p: Principal = request.state.principal
        eng = s.engine.engine
        ctx = eng.max_model_len
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise OpenAIError(
                400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_limit}", param="max_tokens"
            )
        if body.n > cfg.max_n:
            raise OpenAIError(400, f"n is {body.n}; this server allows at most {cfg.max_n}", param="n")
        if not prompt_ids:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < eng.model_config.vocab_size for t in prompt_ids):
            raise OpenAIError(400, f"prompt token ids must be in [0, {eng.model_config.vocab_size})", param="prompt")
        room = ctx - len(prompt_ids)
        if room < 1:
            raise OpenAIError(400, f"the prompt has {len(prompt_ids)} tokens; the context is {ctx}: shorten it", param="messages")
        if max_tokens is not None and max_tokens > room:
            raise OpenAIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of {ctx} tokens",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not 0 < len(x) <= MAX_STOP_CHARS for x in stop):
            raise OpenAIError(
                400, f"stop takes at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters", param="stop"
            )
        try:
            params = [
                SamplingParams(
                    max_tokens=min(max_tokens or room, room, cfg.max_tokens_limit),
                    temperature=body.temperature,
                    top_p=body.top_p,
                    seed=None if body.seed is None else body.seed + i,  # below SEED_MAX: the API caps seed at 2^63-1
                    stop=stop,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    logprobs=logprobs,
                )
                for i in range(body.n)
            ]
        except ValueError as e:  # the protocol's bounds should have caught it: still the caller's input
            raise OpenAIError(400, str(e)) from None
        refused = s.limiter.acquire(p.key_id)
        if refused:
            s.metrics.rate_limited.labels(refused.reason).inc()
            what = "requests per minute" if refused.reason == "rate" else "concurrent requests"
            raise OpenAIError(
                429,
                f"too many {what} for this key: retry in {refused.retry_after_s} s",
                "rate_limit_error",
                headers={"Retry-After": str(refused.retry_after_s)},
            )
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        record = audit_fields(request, 200) | {
            "request_id": rid,
            "model": s.model_id,
            "prompt_tokens": len(prompt_ids) * body.n,
        }
        if cfg.audit_log_prompts:
            record["prompt"] = prompt_text
        t0 = time.perf_counter()
        s.metrics.prompt_tokens.inc(len(prompt_ids) * body.n)
        if body.stream:
            gen = stream_response(s, request, rid, created, chat, prompt_ids, params, record, t0, p)
            return StreamingResponse(
                gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        try:
            outs = await collect_choices(s, request, prompt_ids, params)
        finally:
            s.limiter.release(p.key_id)
        completion_tokens = sum(len(o.token_ids) for o in outs)
        usage = usage_body(len(prompt_ids), body.n, completion_tokens)
        choices = [choice_body(chat, i, o, logprobs, eng) for i, o in enumerate(outs)]
        resp = completion_body(rid, chat, created, choices, usage, s.model_id)
        record.update(completion_tokens=completion_tokens, latency_ms=round((time.perf_counter() - t0) * 1000, 1))
        await s.audit_record(**record)  # durable before the response goes out
        s.results.put(rid, p.key_id, resp)
        s.metrics.requests.labels(record["route"], "200").inc()
        return resp

    async def merged(s: ServerState, prompt_ids, params):
        """(choice index, output) from n engine streams as they come; aborts all on exit."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, sp):
            try:
                async for out in s.engine.generate(prompt_ids, sp):
                    await queue.put((i, out))
            except Exception as e:
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, sp)) for i, sp in enumerate(params)]
        done = 0
        try:
            while done < len(params):
                i, item = await queue.get()
                if isinstance(item, Exception):
                    if isinstance(item, EngineDeadError):
                        raise OpenAIError(503, str(item), "server_error")
                    raise OpenAIError(400, str(item))
                if item.finished:
                    done += 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect_choices(s, request, prompt_ids, params):
        finals: dict[int, object] = {}
        first = None
        t0 = time.perf_counter()
        watcher = asyncio.create_task(watch_disconnect(request))
        try:
            async for i, out in merged(s, prompt_ids, params):
                first = first or time.perf_counter()
                if out.finished:
                    finals[i] = out
                if watcher.done():
                    raise OpenAIError(499, "client disconnected")
        finally:
            watcher.cancel()
        observe(s, t0, first, finals.values())
        return [finals[i] for i in range(len(params))]

    async def watch_disconnect(request: Request):
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    def observe(s, t0, first, finals):
        end = time.perf_counter()
        m = s.metrics
        m.e2e.observe(end - t0)
        if first is not None:
            m.ttft.observe(first - t0)
        for o in finals:
            m.generation_tokens.inc(len(o.token_ids))
            if len(o.token_ids) > 1 and first is not None:
                m.tpot.observe((end - first) / (len(o.token_ids) - 1))

    def usage_body(prompt_len: int, n: int, completion_tokens: int) -> dict:
        prompt_tokens = prompt_len * n
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def completion_body(rid: str, chat: bool, created: int, choices: list, usage: dict, model: str) -> dict:
        obj = "chat.completion" if chat else "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}

    def choice_body(chat, i, o, logprobs, eng):
        lp = None
        if logprobs and o.logprobs is not None:
            toks = [eng.tokenizer.decode([t], skip_special_tokens=False) for t in o.token_ids]
            if chat:
                lp = {
                    "content": [
                        {"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, v in zip(toks, o.logprobs)
                    ]
                }
            else:
                lp = {"tokens": toks, "token_logprobs": o.logprobs, "top_logprobs": None, "text_offset": None}
        if chat:
            return {
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lp,
                "finish_reason": o.finish_reason,
            }
        return {"index": i, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason}

    async def stream_response(s, request, rid, created, chat, prompt_ids, params, record, t0, p):
        obj = "chat.completion.chunk" if chat else "text_completion"
        model_id = s.model_id
        texts = collections.defaultdict(str)
        finals: dict[int, object] = {}
        first = None
        status = "499"  # until the stream completes or fails: the client went away

        def chunk(i, delta_text, finish, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta_text, "logprobs": None, "finish_reason": finish}
            return (
                "data: "
                + json.dumps({"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice]})
                + "\n\n"
            )

        try:
            if chat:
                for i in range(len(params)):
                    yield chunk(i, "", None, role=True)
            try:
                async for i, out in merged(s, prompt_ids, params):
                    first = first or time.perf_counter()
                    texts[i] += out.new_text
                    if out.finished:
                        finals[i] = out
                        tail = out.text[len(texts[i]) :] if out.text.startswith(texts[i]) else ""
                        yield chunk(i, out.new_text + tail, out.finish_reason)
                    elif out.new_text:
                        yield chunk(i, out.new_text, None)
            except OpenAIError as e:  # the engine failed mid-stream: audit it, say so, and no [DONE]
                status = str(e.status)
                record.update(status=e.status, error=e.message[:200])
                with contextlib.suppress(OpenAIError):  # the error event goes out anyway; the drop is counted
                    await s.audit_record(**record)
                yield "data: " + json.dumps(error_body(e.message, e.type, code=e.code)) + "\n\n"
                return
            completion_tokens = sum(len(o.token_ids) for o in finals.values())
            usage = usage_body(len(prompt_ids), len(params), completion_tokens)
            record.update(completion_tokens=completion_tokens, latency_ms=round((time.perf_counter() - t0) * 1000, 1))
            try:
                await s.audit_record(**record)
            except OpenAIError as e:
                yield "data: " + json.dumps(error_body(e.message, e.type, code=e.code)) + "\n\n"
                return  # no [DONE]: the client sees the stream did not complete
            yield (
                "data: "
                + json.dumps({"id": rid, "object": obj, "created": created, "model": model_id, "choices": [], "usage": usage})
                + "\n\n"
            )
            yield "data: [DONE]\n\n"
            status = "200"
            choices = [choice_body(chat, i, finals[i], False, s.engine.engine) for i in range(len(params))]
            s.results.put(rid, p.key_id, completion_body(rid, chat, created, choices, usage, model_id))
        finally:
            s.limiter.release(p.key_id)
            observe(s, t0, first, finals.values())
            s.metrics.requests.labels(record["route"], status).inc()

    return app
