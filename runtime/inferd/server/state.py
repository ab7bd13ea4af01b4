"""What the routes share: the serving engine and its model's load, swap and retirement, the
audit log, the key store, the result store, the limiter and the metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import Request
from prometheus_client import Gauge

from inferd.engine.async_engine import AsyncLLMEngine
from inferd.server import metric_names as n
from inferd.server.anonymous import AnonymousLimiter
from inferd.server.audit import AuditFullError, AuditLog
from inferd.server.auth import KeyStore
from inferd.server.build_info import build_info
from inferd.server.config import ServerConfig
from inferd.server.errors import OpenAIError
from inferd.server.limits import Limiter
from inferd.server.metrics import Metrics
from inferd.server.results import ResultStore
from inferd.store.trust import check_configured

log = logging.getLogger("inferd.server")


class ServerState:
    """`on_fatal(reason)` is called once when the server can no longer serve and must not look
    alive: the start-up model load failed, or the serving engine died. `inferd serve` stops
    uvicorn from it and exits 1, so that systemd (Restart=on-failure) restarts the service and
    its start limit, not a 503 that never ends, reports a bad model."""

    def __init__(self, cfg: ServerConfig, engine: AsyncLLMEngine | None = None, on_fatal: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.on_fatal = on_fatal
        self.fatal: str | None = None
        self.keys = KeyStore(cfg.keys_path)
        self.audit = AuditLog(
            cfg.audit_path,
            cfg.audit_key_path,
            cfg.audit_anchor_path,
            cfg.audit_ring_size,
            cfg.audit_full_timeout_s,
            cfg.audit_segment_bytes,
            cfg.audit_retention_days,
        )
        self.engine = engine
        self.metrics = Metrics(engine_stats=lambda: None if self.engine is None else self.engine.stats(), audit=self.audit)
        self.results = ResultStore.from_config(cfg, self.metrics.registry)
        keys_invalid = Gauge(
            n.KEYS_FILE_INVALID, "1 while the keys file does not parse (the last good keys serve)", registry=self.metrics.registry
        )
        keys_invalid.set_function(lambda: int(self.keys.error is not None))
        self.limiter = Limiter(cfg.limits.max_concurrent_per_key, cfg.limits.requests_per_minute_per_key)
        self.anonymous = AnonymousLimiter(cfg.anonymous_refusals_per_minute)
        self.ready = False
        self.load_error: str | None = None
        self.loading = False
        self.model_id, self.model_path = cfg.model_id, cfg.model
        self.build = build_info(cfg.model, cfg.model_version)
        self.started = int(time.time())

    # ---- the model ------------------------------------------------------------------------
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
            check_configured(cfg, path)  # the signature rule, at start-up and on every admin load
            new = AsyncLLMEngine.start(cfg.engine_config(path), on_error=self.engine_failed)
            old, self.engine = self.engine, new
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

    def start_load(self, path: str | None = None, name: str | None = None, at_start: bool = False) -> None:
        """`load_model` in a thread of its own (a load takes minutes)."""
        self.loading = True
        kwargs = {"path": path, "name": name, "at_start": at_start}
        threading.Thread(target=self.load_model, kwargs=kwargs, name="inferd-load", daemon=True).start()

    def unload(self) -> None:
        """Stop taking requests; the engine finishes those in flight, then shuts down."""
        old, self.engine, self.ready = self.engine, None, False
        self.metrics.ready.set(0)
        threading.Thread(target=self.retire, args=(old,), daemon=True).start()

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
        engine.drain(self.cfg.shutdown_timeout_s)

    def serving(self, model: str) -> AsyncLLMEngine:
        """The engine that serves `model`, or the 404/503 that says why there is none."""
        if model != self.model_id:
            raise OpenAIError(
                404, f"model {model!r} does not exist: this server serves {self.model_id!r}", code="model_not_found"
            )
        if self.fatal is not None:
            raise OpenAIError(503, f"{self.fatal}: the server is restarting", "server_error", code="engine_failed")
        engine = self.engine
        if not self.ready or engine is None:
            raise OpenAIError(503, "the model is not loaded yet: retry when GET /ready answers 200", "server_error")
        return engine

    # ---- the audit log ----------------------------------------------------------------------
    async def audit_record(self, **record) -> None:
        """Queue a one-record event (a request that generates nothing, an admin change) and wait
        until it is durable; raises OpenAIError(503) otherwise."""
        await self.audit_wait(lambda: self.audit.submit(dict(record, kind="request")))

    async def audit_wait(self, submit: Callable) -> None:
        """Wait until the record `submit()` queued is durable; raises OpenAIError(503) otherwise."""
        try:
            await asyncio.wrap_future(submit())
        except AuditFullError as e:
            raise OpenAIError(503, f"request not served: {e}", "server_error", code="audit_unavailable") from None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.audit.close()
        self.results.close()


def state_of(request: Request) -> ServerState:
    return request.app.state.inferd
