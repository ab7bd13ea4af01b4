"""Durable result retrieval: every completed response, kept for a retention period in an embedded
RocksDB (rocksdict), readable only by the key that made it.

The store never takes the service down and never costs a caller the answer (issue 24):
- a failed write (a full or broken disk) makes `put` return False: the caller still returns the
  answer, audits `result_stored: false`, and the errors counter and degraded gauge raise an alert;
- a store that cannot be opened as a database (corrupt) is moved aside to `<dir>.corrupt-<time>`
  and a new one is opened; one that cannot be opened at all leaves the server serving without
  stored results (degraded), never stopped;
- expiry and the size cap run on a schedule (`maintain`), not only at start-up or on read, and
  each pass that deletes anything flushes and compacts, so expired answers leave the disk (the
  write-ahead log and the SST files) instead of waiting in deleted-but-not-compacted data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from rocksdict import BottommostLevelCompaction, CompactOptions, Rdict, WriteBatch

from inferd.server import metric_names as n

log = logging.getLogger("inferd.results")

# Index keys, ordered by creation time, so expiry and the size cap read the oldest results first
# without scanning every one. "\0" sorts before every result id ("chatcmpl-", "cmpl-").
INDEX = "\0t/"
# After a failed write RocksDB refuses every later one (a background error) until it is reopened:
# a failing store is reopened on a write at most this often, so it recovers once space is freed.
REOPEN_S = 30.0


def _index_key(created: float, result_id: str) -> str:
    return f"{INDEX}{int(created * 1e6):020d}/{result_id}"


def _full_compaction() -> CompactOptions:
    # The bottommost level too: by default RocksDB leaves its files alone, and an answer already
    # there (every result of a store reopened after a restart) stayed on disk next to its tombstone.
    opts = CompactOptions()
    opts.set_bottommost_level_compaction(BottommostLevelCompaction.force())
    return opts


_FULL_COMPACTION = _full_compaction()


class ResultStore:
    def __init__(
        self,
        path: str | Path,
        retention_s: float,
        max_bytes: int = 1 << 30,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """`interval_s`: run `maintain` in a thread of its own that often (None: only when called)."""
        self.path, self.retention_s, self.max_bytes, self.clock = Path(path), retention_s, max_bytes, clock
        self.lock = threading.RLock()  # guards bytes and failing; _failed runs inside held sections
        self.errors = 0  # failed opens, writes, reads and maintenance passes
        self.failing = False  # the last write failed (or there is no store): the degraded gauge
        self.quarantined: Path | None = None
        self.bytes = 0
        self.reopened = clock()
        self.db: Rdict | None = self._open()
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = None
        if interval_s:
            self._thread = threading.Thread(target=self._run, args=(interval_s,), name="inferd-results", daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, cfg, registry=None) -> ResultStore:
        """The server's store, its metrics on `registry`."""
        store = cls(
            cfg.results_path,
            cfg.results_retention_hours * 3600,
            max_bytes=int(cfg.results_max_mb * (1 << 20)),
            interval_s=cfg.results_maintenance_interval_s,
        )
        if registry is not None:
            registry.register(ResultStoreCollector(store))
        return store

    # ---- opening ------------------------------------------------------------------------------
    def _open(self, quarantine: bool = True) -> Rdict | None:
        try:
            return self._open_and_index()
        except Exception as e:
            first = e
        self._failed("open", first)
        message = str(first).lower()
        if not quarantine or "lock" in message or "permission" in message or "read-only" in message or "no space" in message:
            return None  # not the store's fault: moving it aside would lose good results
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self.clock())}")
        try:
            self.path.rename(aside)
            self.quarantined = aside
            log.critical(
                "the results store %s could not be opened (%s): moved aside to %s for inspection, a new one is used",
                self.path,
                first,
                aside,
            )
            return self._open_and_index()
        except Exception as e:
            self._failed("open after quarantine", e)
            return None

    def _reopen(self) -> None:
        with self.lock:
            self.reopened = self.clock()
            if self.db is not None:
                with contextlib.suppress(Exception):  # it reports the very write error being recovered from
                    self.db.close()
            self.db = self._open(quarantine=False)  # a full disk is no corruption

    def _open_and_index(self) -> Rdict:
        """Open the database, count its bytes and index results written before the index existed:
        every record is read once, so a store that cannot be read fails here, at start-up."""
        self.path.mkdir(parents=True, exist_ok=True)
        db = Rdict(str(self.path))
        try:
            indexed, size = set(), 0
            for key, _ in db.items(from_key=INDEX):
                if not key.startswith(INDEX):
                    break
                indexed.add(key.rsplit("/", 1)[1])
            for key, raw in db.items():
                if key.startswith(INDEX):
                    continue
                size += len(raw)
                if key not in indexed:
                    db[_index_key(json.loads(raw)["created"], key)] = ""
        except BaseException:
            db.close()
            raise
        self.bytes = size
        return db

    # ---- the request path -------------------------------------------------------------------
    def put(self, result_id: str, owner: str, response: dict) -> bool:
        """Store a result; False (logged, counted) when it could not be: the caller keeps the answer."""
        created = self.clock()
        if self.failing and created - self.reopened >= REOPEN_S:
            self._reopen()
        if self.db is None:
            self._failed("write", RuntimeError(f"no results store is open at {self.path}"))
            return False
        raw = json.dumps({"owner": owner, "created": created, "response": response})
        batch = WriteBatch()
        batch.put(result_id, raw)
        batch.put(_index_key(created, result_id), "")
        try:
            self.db.write(batch)
        except Exception as e:
            self._failed("write", e)
            return False
        with self.lock:
            self.bytes += len(raw)
            self.failing = False
            over = self.bytes > self.max_bytes
        if over and self._thread is not None:
            self._wake.set()  # the maintenance thread deletes and compacts: never the request's thread
        elif over:
            self.maintain()
        return True

    def get(self, result_id: str, owner: str) -> dict | None:
        if self.db is None or result_id.startswith(INDEX):
            return None
        try:
            raw = self.db.get(result_id)
            if raw is None:
                return None
            entry = json.loads(raw)
        except Exception as e:
            self._failed("read", e)
            return None
        if self.clock() - entry["created"] > self.retention_s:
            return None  # the next maintenance pass deletes it
        return entry["response"] if entry["owner"] == owner else None

    # ---- maintenance --------------------------------------------------------------------------
    def maintain(self) -> int:
        """Delete expired results and, beyond the size cap, the oldest ones; then flush and compact
        so that what was deleted is gone from disk. Returns how many results were deleted."""
        db = self.db
        if db is None:
            return 0
        try:
            with self.lock:  # only the bookkeeping: writes go on during the compaction
                deleted = self._delete_oldest()
            if deleted:
                db.flush()
                db.compact_range(None, None, _FULL_COMPACTION)
            return deleted
        except Exception as e:
            self._failed("maintenance", e)
            return 0

    def _delete_oldest(self) -> int:
        expired_before = int((self.clock() - self.retention_s) * 1e6)
        stale = []
        size = self.bytes
        for key, _ in self.db.items(from_key=INDEX):
            if not key.startswith(INDEX):
                break
            created, result_id = key[len(INDEX) :].split("/", 1)
            if int(created) >= expired_before and size <= self.max_bytes:
                break
            raw = self.db.get(result_id)
            size -= len(raw) if raw is not None else 0
            stale.append((key, result_id))
        batch = WriteBatch()
        for key, result_id in stale:
            batch.delete(key)
            batch.delete(result_id)
        if stale:
            self.db.write(batch)
        self.bytes = max(0, size)
        return len(stale)

    def _run(self, interval_s: float) -> None:
        while True:
            self.maintain()
            self._wake.wait(interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return

    def _failed(self, what: str, error: Exception) -> None:
        with self.lock:
            self.errors += 1
            if what != "read":
                self.failing = True
        log.error("results store %s failed at %s: %s", what, self.path, error)

    @property
    def degraded(self) -> bool:
        return self.failing or self.db is None

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self.db is not None:
            with self.lock:
                try:
                    self.db.close()  # flushes: on a full disk that fails, and shutdown must go on
                except Exception as e:
                    self._failed("close", e)
                self.db = None


class ResultStoreCollector:
    """The store's health at scrape time."""

    def __init__(self, store: ResultStore):
        self.store = store

    def collect(self):
        s = self.store
        errors = CounterMetricFamily(n.RESULTS_STORE_ERRORS, "Results store failures: open, write, read, maintenance")
        errors.add_metric([], s.errors)
        yield errors
        yield GaugeMetricFamily(
            n.RESULTS_STORE_DEGRADED, "1 while results are not being stored (answers still returned)", value=int(s.degraded)
        )
        quarantined = int(s.quarantined is not None)
        yield GaugeMetricFamily(n.RESULTS_STORE_QUARANTINED, "1: a corrupt store was moved aside", value=quarantined)
