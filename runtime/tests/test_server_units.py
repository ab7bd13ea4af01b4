"""Audit ring back-pressure and result expiry, without a server process."""

from __future__ import annotations

import threading
import time

import pytest

from inferd.server.audit import AuditFullError, AuditLog, scan
from inferd.server.logging import redact_target
from inferd.server.results import ResultStore


class SlowFile:
    """The audit file, with writes held until the gate opens (a disk that stalls)."""

    def __init__(self, f, gate):
        self.f, self.gate = f, gate

    def write(self, data):
        self.gate.wait(5)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_audit_ring_refuses_after_a_short_wait(tmp_path):
    gate = threading.Event()
    log = AuditLog(tmp_path / "audit.log", ring_size=2, full_timeout=0.2)
    log._file = SlowFile(log._file, gate)
    first = log.submit({"n": 0})  # taken by the writer, which now blocks in write()
    time.sleep(0.1)
    log.submit({"n": 1})
    log.submit({"n": 2})  # the ring (2) is full now
    start = time.monotonic()
    with pytest.raises(AuditFullError, match="behind"):
        log.submit({"n": 3})
    assert time.monotonic() - start >= 0.2
    gate.set()
    first.result(5)
    log.close()
    assert scan(tmp_path / "audit.log").records == 3


def test_results_expire_after_the_retention_period(tmp_path):
    store = ResultStore(str(tmp_path / "db"), retention_s=0.3)
    store.put("r1", "alice", {"x": 1})
    assert store.get("r1", "alice") == {"x": 1}
    assert store.get("r1", "bob") is None
    time.sleep(0.4)
    assert store.get("r1", "alice") is None
    store.put("r2", "alice", {"x": 2})
    time.sleep(0.4)
    assert store.maintain() == 2  # r1 and r2: a read no longer deletes, the scheduled maintain does
    store.close()


# ---- a dead engine -----------------------------------------------------------------------------
def test_a_dead_serving_engine_turns_ready_off_and_asks_to_exit(llama_dir, tmp_path):
    import asyncio

    from inferd.engine.async_engine import EngineDeadError
    from inferd.sampling_params import SamplingParams
    from inferd.server.app import ServerState
    from inferd.server.config import ServerConfig

    fatal = []
    cfg = ServerConfig(model=str(llama_dir), data_dir=str(tmp_path), max_model_len=64, model_allow_unsigned=True)
    state = ServerState(cfg, on_fatal=fatal.append)
    state.load_model(at_start=True)
    assert state.ready and state.metrics.ready._value.get() == 1

    def fail():
        raise RuntimeError("injected engine fault")

    state.engine.engine.step = fail

    async def one_request():
        async for _ in state.engine.generate([1, 2, 3], SamplingParams(max_tokens=2)):
            pass

    with pytest.raises(EngineDeadError, match="injected engine fault"):
        asyncio.run(asyncio.wait_for(one_request(), 30))
    state.engine._thread.join(10)
    assert not state.ready and state.metrics.ready._value.get() == 0
    assert fatal == [state.fatal] and "injected engine fault" in state.fatal
    with pytest.raises(EngineDeadError):  # later requests are refused at once
        asyncio.run(asyncio.wait_for(one_request(), 30))
    state.close()


def test_a_failed_hot_load_is_not_fatal_but_a_failed_start_up_load_is(tmp_path):
    from inferd.server.app import ServerState
    from inferd.server.config import ServerConfig

    fatal = []
    state = ServerState(ServerConfig(model=str(tmp_path / "none"), data_dir=str(tmp_path)), on_fatal=fatal.append)
    state.load_model(str(tmp_path / "other"))
    assert state.load_error and not fatal
    state.load_model(at_start=True)
    assert len(fatal) == 1 and "start-up" in fatal[0] and not state.ready
    state.close()


@pytest.mark.parametrize(
    "target,logged",
    [
        ("/v1/models", "/v1/models"),
        ("/admin/logs?limit=5", "/admin/logs?limit=5"),
        ("/v1/models?api_key=sk-inferd-abc", "/v1/models?api_key=[redacted]"),
        ("/v1/models?key=plain&limit=2", "/v1/models?key=[redacted]&limit=2"),
        ("/v1/models?sk-inferd-abc", "/v1/models?[redacted]"),
        ("/v1/sk-inferd-abc/x", "/v1/[redacted]/x"),
        ("/admin/logs?limit=sk-inferd-abc", "/admin/logs?limit=[redacted]"),
        ("/admin/logs?limit=0123abcd", "/admin/logs?limit=[redacted]"),
    ],
)
def test_access_log_target_is_redacted(target, logged):
    assert redact_target(target) == logged
