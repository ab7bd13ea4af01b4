"""Result expiry, metrics, and the server's shape, without a server process (the audit ring's
back-pressure is in test_audit.py)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

import inferd
from inferd.server.audit import AuditLog
from inferd.server.logging import redact_target
from inferd.server.results import ResultStore


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
    from inferd.server.config import ServerConfig
    from inferd.server.state import ServerState

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
    from inferd.server.config import ServerConfig
    from inferd.server.state import ServerState

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


# ---- the server talks to the engine's face only; code stays readable ---------------------------
RUNTIME = Path(inferd.__file__).parent
ENGINE_INTERNALS = {"scheduler", "block_manager", "runner", "sequences", "model_config"}


def _modules(*dirs: str):
    for d in dirs:
        for path in sorted((RUNTIME / d).glob("*.py")):
            yield path, ast.parse(path.read_text())


def test_the_server_reaches_nothing_behind_the_engines_face():
    for path, tree in _modules("server"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ENGINE_INTERNALS, f"{path.name}:{node.lineno} reads the engine's .{node.attr}"
                inner = node.value
                assert not (node.attr == "engine" and isinstance(inner, ast.Attribute) and inner.attr == "engine"), (
                    f"{path.name}:{node.lineno} reaches past the face (.engine.engine)"
                )
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("inferd.engine."):
                assert node.module == "inferd.engine.async_engine", f"{path.name} imports {node.module}"


def test_no_function_in_server_or_engine_is_longer_than_80_lines():
    for path, tree in _modules("server", "engine"):
        if path.name == "model_runner.py":
            continue  # another refactoring's
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{path.name}: {node.name} is {length} lines"


def test_each_piece_of_sequence_state_has_one_writer():
    writers: dict[str, set[str]] = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        if path.name == "sequence.py":
            continue  # the initial values
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in ("pending_row", "num_computed_tokens", "finish_reason"):
                    writers.setdefault(t.attr, set()).add(path.name)
    assert writers == {
        "pending_row": {"scheduler.py"},
        "num_computed_tokens": {"block_manager.py"},
        "finish_reason": {"scheduler.py"},
    }


def test_engine_metrics_come_from_the_engines_stats_at_scrape_time():
    from prometheus_client import generate_latest

    from inferd.outputs import EngineStats
    from inferd.server.metrics import Metrics

    current = [None]
    metrics = Metrics(engine_stats=lambda: current[0])
    text = generate_latest(metrics.registry).decode()
    assert "inferd_requests_running 0.0" in text and "inferd_kv_cache_usage_ratio 0.0" in text  # no model: zeros
    current[0] = EngineStats(running=3, waiting=2, kv_cache_usage=0.25, prefix_cache_queries=40, prefix_cache_hits=16)
    text = generate_latest(metrics.registry).decode()
    for line in (
        "inferd_requests_running 3.0",
        "inferd_requests_waiting 2.0",
        "inferd_kv_cache_usage_ratio 0.25",
        "inferd_prefix_cache_queries_tokens_total 40.0",
        "inferd_prefix_cache_hits_tokens_total 16.0",
    ):
        assert line in text, line


def test_audit_metrics_are_read_from_the_audit_log_at_scrape_time(tmp_path):
    from prometheus_client import generate_latest

    from inferd.server.metrics import Metrics

    log = AuditLog(tmp_path / "audit.log", tmp_path / "audit.key", tmp_path / "audit.anchor")
    metrics = Metrics(audit=log)
    log.submit({"event": "x"}).result(10)
    text = generate_latest(metrics.registry).decode()
    assert log.written >= 2  # the start record and this one
    assert f"inferd_audit_records_total {float(log.written)}" in text and "inferd_audit_records_dropped_total 0.0" in text
    log.close()


# ---- a stream whose client is gone before its first byte ---------------------------------------
def test_a_stream_refused_before_its_first_byte_gives_its_slots_back_and_ends_in_the_audit(llama_dir, tmp_path):
    """The body generator of a streaming response never starts when sending the response start fails
    (the client left during admission): its limiter slots and its audit `end` must not wait for a
    shutdown."""
    import asyncio
    import json

    from inferd.server.app import create_app
    from inferd.server.auth import KeyStore
    from inferd.server.config import ServerConfig

    cfg = ServerConfig(model=str(llama_dir), data_dir=str(tmp_path), max_model_len=64, model_allow_unsigned=True)
    key = KeyStore(cfg.keys_path).add("alice", "user")
    app = create_app(cfg)
    body = b""

    def scope():
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"test"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"authorization", f"Bearer {key}".encode()),
            ],
            "client": ("127.0.0.1", 5555),
            "server": ("test", 80),
        }

    sent = []

    async def receive():
        if not sent:
            sent.append("body")
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.start":
            raise OSError("client gone")

    async def run():
        nonlocal body
        async with app.router.lifespan_context(app):
            state = app.state.inferd
            for _ in range(600):
                if state.ready:
                    break
                await asyncio.sleep(0.1)
            assert state.ready
            body = json.dumps({"model": state.model_id, "prompt": "hi", "max_tokens": 4, "stream": True}).encode()
            with pytest.raises(OSError, match="client gone"):
                await app(scope(), receive, send)
            assert sum(state.limiter.active.values()) == 0
            for _ in range(100):  # the `end` is written behind the request
                page = state.audit.read_page(10)
                if any(r.get("kind") == "end" for r in page["records"]):
                    break
                await asyncio.sleep(0.1)
            return page

    page = asyncio.run(asyncio.wait_for(run(), 120))
    records = page["records"]
    begins = [r for r in records if r.get("kind") == "begin"]
    ends = [r for r in records if r.get("kind") == "end"]
    assert len(begins) == 1, records
    assert [e["request_id"] for e in ends] == [begins[0]["request_id"]] and ends[0]["status"] == 499, records


def test_every_swap_result_series_exists_from_start_up_at_zero():
    """A labelled counter has no series until its first increment: the dashboard's increase() and
    any alert would see nothing before the first swap (molecule/site evaluates every panel query)."""
    from prometheus_client import generate_latest

    from inferd.server.metrics import SWAP_RESULTS, Metrics

    text = generate_latest(Metrics().registry).decode()
    for result in SWAP_RESULTS:
        assert f'inferd_model_swaps_total{{result="{result}"}} 0.0' in text
    assert "inferd_model_swap_pause_seconds 0.0" in text
