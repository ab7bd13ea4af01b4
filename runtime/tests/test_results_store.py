"""The results store (issue 24): expiry on a schedule that takes expired answers off the disk, a
size cap, a failed write that degrades instead of failing the request, a corrupt store moved
aside with the service still serving."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from inferd.server import metric_names as n
from inferd.server.results import ResultStore, ResultStoreCollector


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def files_holding(path: Path, needle: bytes) -> list[str]:
    return sorted(p.name for p in path.rglob("*") if p.is_file() and needle in p.read_bytes())


def scrape(store: ResultStore) -> dict[str, float]:
    reg = CollectorRegistry()
    reg.register(ResultStoreCollector(store))
    out = {}
    for line in generate_latest(reg).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_expired_answers_are_deleted_from_disk_on_a_schedule(tmp_path):
    clock = Clock()
    store = ResultStore(tmp_path / "r", retention_s=60, interval_s=0.05, clock=clock)
    store.put("cmpl-old", "k1", {"text": "EXPIRED-ANSWER-4711"})
    assert files_holding(tmp_path / "r", b"EXPIRED-ANSWER-4711"), "the answer should be on disk at first"
    clock.t += 61
    store.put("cmpl-new", "k1", {"text": "FRESH-ANSWER"})
    deadline = time.monotonic() + 60
    while files_holding(tmp_path / "r", b"EXPIRED-ANSWER-4711") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert files_holding(tmp_path / "r", b"EXPIRED-ANSWER-4711") == [], "an expired answer is still on disk"
    assert store.get("cmpl-new", "k1") == {"text": "FRESH-ANSWER"}
    store.close()


def test_a_result_past_retention_is_not_served_even_before_maintenance(tmp_path):
    clock = Clock()
    store = ResultStore(tmp_path / "r", retention_s=60, clock=clock)
    store.put("cmpl-1", "k1", {"x": 1})
    assert store.get("cmpl-1", "k1") == {"x": 1} and store.get("cmpl-1", "k2") is None
    clock.t += 61
    assert store.get("cmpl-1", "k1") is None
    store.close()


def test_the_size_cap_deletes_the_oldest_results_first(tmp_path):
    clock = Clock()
    store = ResultStore(tmp_path / "r", retention_s=3600, max_bytes=4000, clock=clock)
    for i in range(20):
        clock.t += 1
        assert store.put(f"cmpl-{i:02d}", "k", {"text": "x" * 400})
    assert store.bytes <= 4000
    kept = [i for i in range(20) if store.get(f"cmpl-{i:02d}", "k") is not None]
    assert kept and kept == list(range(20 - len(kept), 20)), f"not the newest ones kept: {kept}"
    store.close()
    reopened = ResultStore(tmp_path / "r", retention_s=3600, max_bytes=4000, clock=clock)
    assert reopened.bytes == store.bytes  # counted again at start-up
    reopened.close()


def test_results_written_before_the_index_are_indexed_and_expire(tmp_path):
    from rocksdict import Rdict

    db = Rdict(str(tmp_path / "r"))  # the layout of the store before issue 24: result id -> entry
    db["cmpl-legacy"] = '{"owner": "k", "created": 1000.0, "response": {"text": "LEGACY-ANSWER"}}'
    db.close()
    clock = Clock(1000.0 + 10)
    store = ResultStore(tmp_path / "r", retention_s=60, clock=clock)
    assert store.get("cmpl-legacy", "k") == {"text": "LEGACY-ANSWER"}
    clock.t += 60
    assert store.maintain() == 1
    assert files_holding(tmp_path / "r", b"LEGACY-ANSWER") == []
    store.close()


def fill(disk: Path) -> None:
    try:
        with open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == 28, e


def test_a_full_disk_degrades_alerts_and_recovers(tiny_disk):
    clock = Clock()
    store = ResultStore(tiny_disk / "r", retention_s=3600, clock=clock)
    assert store.put("cmpl-1", "k", {"text": "kept"})
    assert scrape(store)[n.RESULTS_STORE_DEGRADED] == 0
    fill(tiny_disk)
    assert store.put("cmpl-2", "k", {"text": "y" * 20000}) is False  # no exception: the caller keeps the answer
    metrics = scrape(store)
    assert metrics[n.RESULTS_STORE_ERRORS] >= 1 and metrics[n.RESULTS_STORE_DEGRADED] == 1
    assert store.get("cmpl-1", "k") == {"text": "kept"}  # what was stored is still served
    (tiny_disk / "filler").unlink()
    clock.t += 31  # the store is reopened on a write at most every REOPEN_S
    assert store.put("cmpl-3", "k", {"text": "after"})
    assert scrape(store)[n.RESULTS_STORE_DEGRADED] == 0
    assert store.get("cmpl-3", "k") == {"text": "after"} and store.get("cmpl-1", "k") == {"text": "kept"}
    store.close()


def test_a_corrupt_store_is_moved_aside_and_a_new_one_serves(tmp_path):
    path = tmp_path / "results"
    store = ResultStore(path, retention_s=3600)
    store.put("cmpl-1", "k", {"text": "before"})
    store.close()
    for f in path.glob("MANIFEST-*"):
        f.write_bytes(b"\xff" * f.stat().st_size)
    store = ResultStore(path, retention_s=3600)
    assert store.quarantined is not None and store.quarantined.name.startswith("results.corrupt-")
    assert (store.quarantined / "CURRENT").exists(), "the corrupt store is kept for inspection"
    assert store.put("cmpl-2", "k", {"text": "after"}) and store.get("cmpl-2", "k") == {"text": "after"}
    metrics = scrape(store)
    assert metrics[n.RESULTS_STORE_QUARANTINED] == 1 and metrics[n.RESULTS_STORE_ERRORS] >= 1
    store.close()


def test_a_store_that_cannot_be_opened_leaves_the_server_serving(tmp_path, llama_dir):
    """Another process holds the store's lock: it is not moved aside, the server still starts."""
    from rocksdict import Rdict

    from inferd.server.app import ServerState
    from inferd.server.config import ServerConfig

    holder = Rdict(str(tmp_path / "results"))
    holder["cmpl-x"] = "{}"
    cfg = ServerConfig(model=str(llama_dir), data_dir=str(tmp_path), model_allow_unsigned=True)
    state = ServerState(cfg)
    assert state.results.degraded and state.results.quarantined is None
    assert state.results.put("cmpl-1", "k", {"a": 1}) is False and state.results.get("cmpl-1", "k") is None
    assert f"{n.RESULTS_STORE_DEGRADED} 1.0" in generate_latest(state.metrics.registry).decode()
    state.close()
    holder.close()
    assert Rdict(str(tmp_path / "results"))["cmpl-x"] == "{}"  # untouched


def test_the_server_config_reaches_the_store(tmp_path):
    cfg = SimpleNamespace(
        results_path=tmp_path / "r", results_retention_hours=1, results_max_mb=1, results_maintenance_interval_s=3600
    )
    reg = CollectorRegistry()
    store = ResultStore.from_config(cfg, reg)
    assert store.max_bytes == 1 << 20 and store.retention_s == 3600
    assert f"{n.RESULTS_STORE_DEGRADED} 0.0" in generate_latest(reg).decode()
    store.close()


def test_the_size_cap_is_enforced_by_the_maintenance_thread(tmp_path):
    store = ResultStore(tmp_path / "r", retention_s=3600, max_bytes=4000, interval_s=3600)
    for i in range(20):
        assert store.put(f"cmpl-{i:02d}", "k", {"text": "x" * 400})  # over the cap: the thread is woken
    deadline = time.monotonic() + 60
    while store.bytes > 4000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.bytes <= 4000 and store.get("cmpl-19", "k") is not None
    store.close()
