"""The audit log: one record per request and per admin action, durable before the response
completes, tamper-evident.

Requests put records into a bounded in-memory ring; one writer thread takes whatever has
accumulated, appends it and fsyncs once for the whole batch (group commit), then wakes the
waiting requests. When the ring is full a request waits briefly, then is refused (503): nothing
is served unaudited.

On disk each record is a frame: 4-byte length, 4-byte CRC32 of the payload, then the payload
(canonical JSON). Each payload carries its sequence number and the sha256 of the previous
payload, so `verify` detects an edited byte (CRC or chain), a deleted record (a gap in the
sequence) and a reordering (sequence and chain), and tolerates a torn last frame after a crash.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

HEADER = struct.Struct("<II")
GENESIS = "0" * 64


class AuditFullError(RuntimeError):
    pass


class AuditVerifyError(ValueError):
    pass


@dataclass
class ScanResult:
    records: int
    last_seq: int
    last_hash: str
    good_bytes: int  # the offset just after the last complete, valid frame
    torn_tail: bool


def scan(path: str | Path, strict: bool = True) -> ScanResult:
    """Read every frame. With strict, any damage other than a torn last frame raises
    AuditVerifyError naming the record."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    pos, seq, prev, count = 0, -1, GENESIS, 0
    while pos < len(data):
        if len(data) - pos < HEADER.size:
            return ScanResult(count, seq, prev, pos, True)
        length, crc = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size : pos + HEADER.size + length]
        if len(body) < length:
            return ScanResult(count, seq, prev, pos, True)
        where = f"record {seq + 1} (byte offset {pos})"
        if zlib.crc32(body) != crc:
            raise AuditVerifyError(f"{where}: checksum mismatch: the record was edited or damaged")
        try:
            rec = json.loads(body)
        except ValueError:
            raise AuditVerifyError(f"{where}: not valid JSON") from None
        if rec.get("seq") != seq + 1:
            raise AuditVerifyError(
                f"{where}: sequence jumps from {seq} to {rec.get('seq')}: records were deleted or reordered (a gap)"
            )
        if rec.get("prev") != prev:
            raise AuditVerifyError(f"{where}: hash chain broken: a record before it was edited, deleted or reordered")
        prev = hashlib.sha256(body).hexdigest()
        seq = rec["seq"]
        count += 1
        pos += HEADER.size + length
    return ScanResult(count, seq, prev, pos, False)


class AuditLog:
    def __init__(self, path: str | Path, ring_size: int = 4096, full_timeout: float = 0.5, metrics=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = scan(self.path)  # refuse to append to a damaged log
        if state.torn_tail:
            with open(self.path, "r+b") as f:  # a crash mid-write: drop the torn frame
                f.truncate(state.good_bytes)
        self._seq, self._prev = state.last_seq, state.last_hash
        self._file = open(self.path, "ab")
        self.ring_size = ring_size
        self.full_timeout = full_timeout
        self._ring: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.written = 0
        self.metrics = metrics
        self._thread = threading.Thread(target=self._writer, name="inferd-audit", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._ring)

    def submit(self, record: dict) -> concurrent.futures.Future:
        """Queue a record; the future resolves once it is on disk (fsynced)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        deadline = time.monotonic() + self.full_timeout
        with self._cond:
            while len(self._ring) >= self.ring_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AuditFullError("the audit log is behind: try again shortly")
                self._cond.wait(left)
            if self._closed:
                raise AuditFullError("the audit log is closed (shutting down)")
            self._ring.append((record, fut))
            self._cond.notify_all()
        return fut

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._ring and not self._closed:
                    self._cond.wait()
                if not self._ring and self._closed:
                    return
                batch = list(self._ring)
                self._ring.clear()
                self._cond.notify_all()
            frames = []
            for record, _ in batch:
                self._seq += 1
                payload = dict(record, seq=self._seq, prev=self._prev)
                body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
                self._prev = hashlib.sha256(body).hexdigest()
                frames.append(HEADER.pack(len(body), zlib.crc32(body)) + body)
            try:
                self._file.write(b"".join(frames))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                self.dropped += len(batch)
                for _, fut in batch:
                    fut.set_exception(AuditFullError(f"the audit log could not be written: {e}"))
                continue
            self.written += len(batch)
            for _, fut in batch:
                fut.set_result(None)

    def close(self) -> None:
        """Write everything queued, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._file.close()


def read_records(path: str | Path) -> list[dict]:
    """All complete records, oldest first (for the ops log view)."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    out, pos = [], 0
    while pos + HEADER.size <= len(data):
        length, _ = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size : pos + HEADER.size + length]
        if len(body) < length:
            break
        out.append(json.loads(body))
        pos += HEADER.size + length
    return out
