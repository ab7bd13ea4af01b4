"""The audit log: evidence of every request, written before its first byte of output, keyed,
anchored, rotated. The format (frames, segments, key, anchor) is in audit_format.py; the full
check (`inferd audit verify`) in audit_verify.py.

A generation request leaves two records: `begin` (who, from where, what) made durable before
generation starts, and `end` (status, tokens, and `cut_short` when the client went away, the
engine failed or the server stopped) after. A request killed with the process (kill -9, power
loss) has a begin and no end: the next start writes a `start` record saying the previous run did
not stop cleanly, and verify lists such requests as interrupted. Other requests and admin actions
leave one `request` record, durable before the response.

Requests put records into a bounded in-memory ring; one writer thread takes whatever has
accumulated, appends it as whole frames with one os.write on an O_APPEND descriptor, fsyncs once
for the batch (group commit), replaces the anchor, then wakes the waiting requests. A failed or
short write (disk full) is cut back to the last good frame and advances nothing: begins and
single records fail (the request is refused with 503, nothing is served unaudited), ends (whose
response has gone out) are kept and retried, and the first write that succeeds again starts with
an `outage` record saying what was refused, when and why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from inferd.server.audit_format import (
    GENESIS,
    MAGIC,
    AuditVerifyError,
    OldFormatError,
    TornFrame,
    check_mac,
    encode_frame,
    fsync_dir,
    key_id,
    load_key,
    open_segment,
    read_anchor,
    read_frame,
    read_frame_before,
    read_records,
    rotated_path,
    rotated_segments,
    segment_number,
    write_anchor,
)

__all__ = ["AuditFullError", "AuditLog", "AuditVerifyError", "outcome_of", "read_records"]
log = logging.getLogger("inferd.audit")


class AuditFullError(RuntimeError):
    pass


def outcome_of(exc: BaseException) -> dict:
    """The `end` fields of a request that raised `exc` before it completed."""
    status = getattr(exc, "status", None)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return {"status": 499, "cut_short": "client disconnected or server stopped"}
    if status is not None:
        cut_short = "client disconnected" if status == 499 else "failed"
        return {"status": status, "cut_short": cut_short, "error": str(getattr(exc, "message", exc))[:200]}
    return {"status": 500, "cut_short": "failed", "error": f"{type(exc).__name__}: {exc}"[:200]}


class AuditLog:
    RETRY_S = 1.0  # how often kept records are retried while the disk refuses writes
    CLOSE_ATTEMPTS = 3

    def __init__(
        self,
        path: str | Path,
        key_file: str | Path,
        anchor_file: str | Path,
        ring_size: int = 4096,
        full_timeout: float = 0.5,
        segment_bytes: int = 64 << 20,
        retention_days: float | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key = load_key(Path(key_file), create=True)
        self.anchor_file = Path(anchor_file)
        self.segment_bytes, self.retention_days = segment_bytes, retention_days
        self.ring_size, self.full_timeout = ring_size, full_timeout
        self._ring: deque = deque()
        self._retry: list = []  # (record, future) kept through a failed write
        self._outage: dict | None = None
        self._open: set[str] = set()  # request ids with a begin and no end yet
        self._cond = threading.Condition()
        self._closed = False
        self._broken: str | None = None
        self.dropped = 0
        self.written = 0
        self._fd: int | None = None
        self._seg_header: dict | None = None  # the record that starts the next segment
        self._seq, self._prev, self._size, self._segment = -1, GENESIS, 0, 1
        clean = self._recover()
        self._thread = threading.Thread(target=self._writer, name="inferd-audit", daemon=True)
        self._thread.start()
        start = {"kind": "start", "previous_shutdown": clean, "ts": time.time()}
        self.submit(start).result(30)  # a log that cannot be written at start-up stops the start

    @property
    def depth(self) -> int:
        return len(self._ring)

    # ---- what requests call ------------------------------------------------------------------
    def submit(self, record: dict, force: bool = False) -> concurrent.futures.Future:
        """Queue a record; the future resolves once it is on disk (fsynced). `force`: never wait
        for room (a request's end: its begin is on disk, the end must follow)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        record.setdefault("ts", time.time())
        deadline = time.monotonic() + self.full_timeout
        with self._cond:
            while not force and len(self._ring) >= self.ring_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AuditFullError("the audit log is behind: try again shortly")
                self._cond.wait(left)
            if self._broken:
                raise AuditFullError(f"the audit log is out of service: {self._broken}")
            if self._closed:
                raise AuditFullError("the audit log is closed (shutting down)")
            if record.get("kind") == "begin":
                self._open.add(record["request_id"])
            self._ring.append((record, fut))
            self._cond.notify_all()
        return fut

    def begin(self, request_id: str, record: dict) -> concurrent.futures.Future:
        return self.submit(dict(record, kind="begin", request_id=request_id))

    def end(self, request_id: str, **outcome) -> concurrent.futures.Future:
        """The request's outcome. Only the first end of a request counts: later calls (the
        `finally` of a request that already ended) return a resolved future."""
        with self._cond:
            if request_id not in self._open:
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(None)
                return done
            self._open.discard(request_id)
        try:
            return self.submit(dict(outcome, kind="end", request_id=request_id), force=True)
        except AuditFullError as e:
            log.error("the end of request %s could not be queued: %s", request_id, e)
            failed: concurrent.futures.Future = concurrent.futures.Future()
            failed.set_exception(e)
            return failed

    def close(self) -> None:
        """End the requests still open (the server is stopping), write everything queued and a
        `stop` record, and mark the anchor clean."""
        with self._cond:
            if self._closed:
                return
            for rid in sorted(self._open):
                fut: concurrent.futures.Future = concurrent.futures.Future()
                rec = {"kind": "end", "request_id": rid, "status": 499, "cut_short": "server stopped", "ts": time.time()}
                self._ring.append((rec, fut))
            self._open.clear()
            stop: concurrent.futures.Future = concurrent.futures.Future()
            self._ring.append(({"kind": "stop", "ts": time.time()}, stop))
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if stop.done() and stop.exception() is None:
            with contextlib.suppress(OSError):
                self._write_anchor(clean=True)
            log.info("audit head: record %d, mac %s (clean shutdown)", self._seq, self._prev)
        else:
            log.error("the audit log could not record the shutdown: the next start reports it as unclean")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---- start-up: read only the tail --------------------------------------------------------
    def _recover(self) -> str:
        """Find the head from the anchor and the records after it; return how the previous run
        ended ("clean", "unclean" or "none")."""
        migrated = self._migrate_v1()
        anchor = read_anchor(self.anchor_file, self.key)
        rotated = rotated_segments(self.path)
        has_active = self.path.exists() and self.path.stat().st_size > len(MAGIC)
        if anchor is None:
            if rotated or has_active:
                raise AuditVerifyError(
                    f"the audit log {self.path} exists but its anchor {self.anchor_file} does not: whether records "
                    "were removed cannot be told. Run `inferd audit verify`, keep the audit directory as evidence "
                    "(move it aside) and start again for a new log"
                )
            self._seg_header = {"kind": "segment", "segment": 1, "key_id": key_id(self.key), **migrated}
            return "none"
        self._segment, self._seq, self._prev = anchor["segment"], anchor["seq"], anchor["mac"]
        tail = self.path if self._active_number() == anchor["segment"] else rotated_path(self.path, anchor["segment"])
        if not tail.exists():
            raise AuditVerifyError(f"the audit segment {tail} named by the anchor {self.anchor_file} is missing")
        end = self._follow(tail, anchor, tail == self.path)
        if tail != self.path:  # a crash during rotation: the anchor still names the segment before
            self._segment += 1
            number = self._active_number()
            if number is None:  # no active file, or one with no complete first record
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self._size = end
                self._seg_header = {"kind": "segment", "segment": self._segment, "key_id": key_id(self.key)}
                return "clean" if anchor.get("clean") else "unclean"
            if number != self._segment:
                raise AuditVerifyError(
                    f"{self.path} is segment {number} but its anchor names segment {anchor['segment']}: run `inferd audit verify`"
                )
            end = self._follow(self.path, {"offset": len(MAGIC)}, True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = end
        return "clean" if anchor.get("clean") else "unclean"

    def _active_number(self) -> int | None:
        if not self.path.exists() or self.path.stat().st_size <= len(MAGIC):
            return None
        return segment_number(self.path)

    def _follow(self, path: Path, anchor: dict, active: bool) -> int:
        """Check the record at the anchor, then read on to the end of `path`; return the end of
        the last good frame (a torn one after it, from a crash, is cut off)."""
        fd, size = open_segment(path)
        try:
            pos = anchor["offset"]
            if size < pos:
                raise AuditVerifyError(
                    f"the audit log {path} is shorter ({size} bytes) than its anchor says ({pos} bytes, record "
                    f"{anchor['seq']}): records were removed. Run `inferd audit verify` to see what is missing"
                )
            if "seq" in anchor:
                at = read_frame_before(fd, pos, f"{path}: ")
                check_mac(self.key, at, f"{path}: record {anchor['seq']}")
                if at.record.get("seq") != anchor["seq"] or at.mac != anchor["mac"]:
                    raise AuditVerifyError(f"{path}: the record at the anchor is not the one anchored: the log was rewritten")
            while pos < size:
                try:
                    frame = read_frame(fd, pos, size, f"{path}: ")
                except TornFrame:
                    break
                check_mac(self.key, frame, f"{path}: record at byte offset {pos}")
                if frame.record.get("seq") != self._seq + 1 or frame.record.get("prev") != self._prev:
                    raise AuditVerifyError(f"{path}: the records after the anchor do not follow it (byte offset {pos})")
                self._seq, self._prev, pos = self._seq + 1, frame.mac, frame.end
        finally:
            os.close(fd)
        if pos < size:
            if not active:
                raise AuditVerifyError(f"{path}: a rotated segment ends with an incomplete record")
            log.warning("audit: a torn last record (a crash mid-write) at byte %d of %s is cut off", pos, path)
            with open(path, "r+b") as f:
                f.truncate(pos)
        return pos

    def _migrate_v1(self) -> dict:
        """A v1 log (unkeyed, one file) is moved aside, untouched, and the new chain's first record
        names it and its last hash."""
        if not self.path.exists() or self.path.stat().st_size <= len(MAGIC):
            return {}
        try:
            os.close(open_segment(self.path)[0])
            return {}
        except OldFormatError:
            pass
        from inferd.server.audit_verify import scan_v1

        old = self.path.with_name(self.path.name + ".v1")
        if old.exists():
            raise AuditVerifyError(f"{self.path} is a v1 log and {old} exists too: move one of them aside")
        result = scan_v1(self.path)
        os.rename(self.path, old)
        fsync_dir(self.path.parent)
        log.warning("audit: the v1 log %s was moved to %s (%d records)", self.path, old, result.records)
        return {"v1_log": old.name, "v1_records": result.records, "v1_last_hash": result.last_hash}

    # ---- the writer thread -------------------------------------------------------------------
    def _writer(self) -> None:
        attempts_after_close = 0
        while True:
            with self._cond:
                while not self._ring and not self._closed and not self._retry:
                    self._cond.wait()
                if self._retry and not self._ring and not self._closed:
                    self._cond.wait(self.RETRY_S)
                if self._closed and not self._ring and (not self._retry or attempts_after_close >= self.CLOSE_ATTEMPTS):
                    self._fail(self._retry, "the audit log could not be written before shutdown")
                    return
                if self._closed and self._retry and not self._ring:
                    attempts_after_close += 1
                    self._cond.wait(self.RETRY_S / 4)
                batch = self._retry + list(self._ring)
                self._retry = []
                self._ring.clear()
                self._cond.notify_all()
            try:
                self._commit(batch)
            except Exception as e:  # a bug must not leave every waiting request hanging
                log.exception("audit: the writer failed")
                self._fail(batch, f"the audit writer failed: {type(e).__name__}: {e}")

    def _commit(self, batch: list) -> None:
        records = [r for r, _ in batch]
        if self._outage:
            records.insert(0, dict(self._outage, kind="outage", ts=time.time()))
        try:
            self._append(records)
        except OSError as e:
            self._failed_write(batch, e)
            return
        self._outage = None
        self.written += len(batch)
        try:
            self._write_anchor(clean=False)
        except OSError as e:  # the records are on disk: the anchor lags, verify says so
            log.error("audit: the anchor %s could not be written: %s", self.anchor_file, e)
        for _, fut in batch:
            fut.set_result(None)
        if self._size >= self.segment_bytes:
            self._rotate()

    def _append(self, records: list[dict]) -> None:
        """Write whole frames and fsync; on any failure cut the file back to the last good frame
        and advance nothing."""
        if self._fd is None:
            self._open_segment()
            records = [dict(self._seg_header, ts=time.time()), *records]
        frames, seq, prev = [], self._seq, self._prev
        for rec in records:
            seq += 1
            frame, prev = encode_frame(self.key, dict(rec, seq=seq, prev=prev))
            frames.append(frame)
        data = b"".join(frames)
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"short write: {n} of {len(data)} bytes")
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as e:
                self._broken = f"a failed write could not be cut back ({e}): restart the server"
                log.critical("audit: %s", self._broken)
            raise
        with self._cond:  # read_page takes (segment, size) together
            self._seq, self._prev, self._size = seq, prev, self._size + len(data)
        self._seg_header = None

    def _open_segment(self) -> None:
        """Create the active file for segment self._segment (its first record goes with the next
        write). A file left with only the magic by an earlier failure is reused."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size not in (0, len(MAGIC)):
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a new segment")
            if size == 0:
                if os.write(fd, MAGIC) != len(MAGIC):
                    os.ftruncate(fd, 0)
                    raise OSError(errno.ENOSPC, "short write of the segment header")
            os.fsync(fd)
            fsync_dir(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        with self._cond:
            self._fd, self._size = fd, len(MAGIC)

    def _failed_write(self, batch: list, error: OSError) -> None:
        now = time.time()
        # An end is kept (its begin is on disk) but its waiter is told now: the response is not
        # completed (503, or a stream without [DONE]), and the record says its write was delayed.
        kept = [(dict(r, delayed=str(error)[:200]), concurrent.futures.Future()) for r, _ in batch if r.get("kind") == "end"]
        refused = [(r, f) for r, f in batch if r.get("kind") != "end"]
        o = self._outage or {"from_ts": now, "refused": 0, "refused_begins": []}
        o.update(to_ts=now, error=str(error)[:200], refused=o["refused"] + len(refused))
        o["refused_begins"] = (o["refused_begins"] + [r["request_id"] for r, _ in refused if r.get("kind") == "begin"])[:100]
        self._outage = o
        self.dropped += len(refused)
        log.error("audit: a write failed (%s): %d records refused, %d kept for retry", error, len(refused), len(kept))
        with self._cond:
            for r, _ in refused:
                if r.get("kind") == "begin":
                    self._open.discard(r["request_id"])
            self._retry = kept + self._retry
        self._fail(batch, f"the audit log could not be written: {error}")

    @staticmethod
    def _fail(items: list, message: str) -> None:
        for _, fut in items:
            if not fut.done():
                fut.set_exception(AuditFullError(message))

    def _write_anchor(self, clean: bool) -> None:
        segment = self._segment if self._fd is not None else self._segment - 1  # rotated, next not begun
        head = {"segment": segment, "seq": self._seq, "mac": self._prev, "offset": self._size, "clean": clean}
        write_anchor(self.anchor_file, self.key, dict(head, ts=time.time()))

    # ---- rotation and retention --------------------------------------------------------------
    def _rotate(self) -> None:
        """The active segment becomes audit.log.NNNNNN; the next write starts a new one whose
        first record chains to this one's last."""
        try:
            with self._cond:
                os.close(self._fd)
                self._fd = None
                os.rename(self.path, rotated_path(self.path, self._segment))
                self._segment += 1
            fsync_dir(self.path.parent)
        except OSError as e:
            log.error("audit: rotation failed: %s", e)
            self._broken = f"rotation failed ({e}): restart the server"
            return
        # The head, outside the log too (the journal): a later truncation contradicts it.
        log.info("audit head: segment %d ends at record %d, mac %s", self._segment - 1, self._seq, self._prev)
        self._seg_header = {"kind": "segment", "segment": self._segment, "key_id": key_id(self.key)}
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete whole rotated segments older than the retention, after a `retention` record
        (durable) names them and the last mac they held: the rest still verifies from it."""
        if self.retention_days is None:
            return
        cutoff = time.time() - self.retention_days * 86400
        old = [(n, p) for n, p in rotated_segments(self.path) if p.stat().st_mtime < cutoff]
        if not old:
            return
        last_number, last_path = old[-1]
        fd, size = open_segment(last_path)
        try:
            tail = read_frame_before(fd, size, f"{last_path}: ")
        finally:
            os.close(fd)
        record = {
            "kind": "retention",
            "deleted_segments": [n for n, _ in old],
            "through_segment": last_number,
            "last_seq": tail.record["seq"],
            "last_mac": tail.mac,
            "retention_days": self.retention_days,
        }
        try:
            self._append([record])
            self._write_anchor(clean=False)
        except OSError as e:
            log.error("audit: retention postponed, its record could not be written: %s", e)
            return
        for _, p in old:
            p.unlink()
        fsync_dir(self.path.parent)

    # ---- the paged view (/admin/logs) --------------------------------------------------------
    def read_page(self, limit: int, before: str | None = None) -> dict:
        """Up to `limit` records before the cursor `before` (default: the newest), oldest first,
        and the cursor of the page before (None at the oldest record kept). Reads only the frames
        returned: call it off the event loop all the same (it is file I/O)."""
        with self._cond:
            segment, end = (self._segment, self._size) if self._fd is not None else (self._segment - 1, None)
        if before is not None:
            try:
                seg_text, _, end_text = before.partition(":")
                segment, end = int(seg_text), (int(end_text) if end_text else None)
            except ValueError:
                raise ValueError("before must be a cursor returned as next_before by an earlier call") from None
        records: list[dict] = []
        while segment >= 1 and len(records) < limit:
            path = self.path if segment == self._segment else rotated_path(self.path, segment)
            try:
                fd, size = open_segment(path)
            except FileNotFoundError:
                segment = 0  # deleted by retention: nothing older is kept
                break
            try:
                end = size if end is None else min(end, size)
                while len(records) < limit and end > len(MAGIC):
                    frame = read_frame_before(fd, end, f"{path}: ")
                    records.append(frame.record)
                    end = frame.start
            finally:
                os.close(fd)
            if end <= len(MAGIC):
                segment, end = segment - 1, None
        records.reverse()
        cursor = f"{segment}:{'' if end is None else end}" if segment >= 1 else None
        return {"records": records, "next_before": cursor}
