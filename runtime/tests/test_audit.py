"""The audit log as evidence, without a server: keyed chain, anchor, segments and retention,
disk full, start-up and paging that read only what they need (issue 24 item 2)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from inferd.server.audit import AuditFullError, AuditLog
from inferd.server.audit_format import MAGIC, encode_frame, iter_segment, read_records, rotated_segments
from inferd.server.audit_verify import verify


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", *args], capture_output=True, text=True, timeout=120)


class Files:
    def __init__(self, root: Path):
        self.log, self.key, self.anchor = root / "audit" / "audit.log", root / "audit.key", root / "audit.anchor"

    def open(self, **kw) -> AuditLog:
        return AuditLog(self.log, self.key, self.anchor, **kw)

    def verify(self, log: Path | None = None) -> subprocess.CompletedProcess:
        return cli("audit", "verify", str(log or self.log), "--key-file", str(self.key), "--anchor-file", str(self.anchor))


@pytest.fixture
def files(tmp_path) -> Files:
    return Files(tmp_path)


def fill(log: AuditLog, n: int, prefix: str = "r") -> None:
    for i in range(n):
        log.begin(f"{prefix}{i}", {"route": "/v1/completions", "key_id": "k"}).result(10)
        log.end(f"{prefix}{i}", status=200, completion_tokens=i).result(10)


def frames_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[f.start : f.end] for f in iter_segment(path)]


# ---- the key ----------------------------------------------------------------------------------
def test_the_key_is_made_0600_on_first_start_and_a_readable_one_is_refused(files):
    files.open().close()
    assert files.key.stat().st_mode & 0o777 == 0o600
    files.key.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        files.open()


def test_a_wrong_key_is_named_as_such(files, tmp_path):
    fill(files.open(), 1)
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex())
    r = cli("audit", "verify", str(files.log), "--key-file", str(other))
    assert r.returncode == 1 and "another key" in r.stderr, r.stderr


def test_verify_without_a_key_is_a_usage_error(files):
    fill(files.open(), 1)
    r = cli("audit", "verify", str(files.log))
    assert r.returncode == 2 and "--key-file" in r.stderr


# ---- tampering that the v1 chain missed ----------------------------------------------------------
def test_editing_the_last_record_is_detected(files):
    """v1: the last record's hash was in no later record: an edit with a fresh CRC passed."""
    log = files.open()
    fill(log, 2)
    log.close()
    frames = frames_of(files.log)
    last = json.loads(frames[-1][40:-4])
    last["kind"] = "end-edited"
    forged, _ = encode_frame(os.urandom(32), last)  # the attacker has no key: any key is a wrong one
    files.log.write_bytes(MAGIC + b"".join(frames[:-1]) + forged)
    r = files.verify()
    assert r.returncode == 1 and "MAC mismatch" in r.stderr and f"record {last['seq']}" in r.stderr, r.stderr


def test_dropping_the_last_records_at_a_frame_boundary_is_detected(files):
    log = files.open()
    fill(log, 3)
    log.close()
    frames = frames_of(files.log)
    files.log.write_bytes(MAGIC + b"".join(frames[:-3]))
    r = files.verify()
    n = len(frames)
    assert r.returncode == 1 and "truncated" in r.stderr and f"records {n - 3}..{n - 1} were removed" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="shorter"):
        files.open()  # and the server refuses to append to it


def test_deleting_a_middle_record_and_rechaining_is_detected(files):
    log = files.open()
    fill(log, 3)
    log.close()
    records = read_records(files.log)
    del records[3]
    rechained, prev, key = [], "0" * 64, os.urandom(32)
    for seq, rec in enumerate(records):
        frame, prev = encode_frame(key, dict(rec, seq=seq, prev=prev))
        rechained.append(frame)
    files.log.write_bytes(MAGIC + b"".join(rechained))
    r = files.verify()
    assert r.returncode == 1 and "record 0" in r.stderr, r.stderr


def test_a_deleted_anchor_is_reported_and_the_server_refuses_to_start(files):
    fill(files.open(), 1)
    files.anchor.unlink()
    r = files.verify()
    assert r.returncode == 1 and "anchor" in r.stderr and "missing" in r.stderr
    with pytest.raises(ValueError, match="anchor"):
        files.open()


# ---- begin / end, and what each way of stopping leaves ------------------------------------------
def test_a_request_killed_with_the_process_is_reported_interrupted_not_tampered(files):
    log = files.open()
    log.begin("killed", {"route": "/v1/completions"}).result(10)
    # kill -9: nothing more is written; the next start finds the anchor not clean
    log._closed = True
    files.open().close()
    r = files.verify()
    assert r.returncode == 0, r.stderr
    assert "request killed (begun at record 2) has no end: the server was killed or crashed" in r.stdout, r.stdout


def test_close_ends_the_requests_still_open(files):
    log = files.open()
    log.begin("streaming", {"route": "/v1/completions"}).result(10)
    log.close()
    ends = [r for r in read_records(files.log) if r.get("kind") == "end"]
    assert ends == [ends[0]] and ends[0]["request_id"] == "streaming" and ends[0]["cut_short"] == "server stopped"
    assert read_records(files.log)[-1]["kind"] == "stop"
    assert "0 requests interrupted" in files.verify().stdout


def test_only_the_first_end_of_a_request_counts(files):
    log = files.open()
    log.begin("r", {}).result(10)
    log.end("r", status=200).result(10)
    log.end("r", status=499, cut_short="client disconnected").result(10)
    log.close()
    assert [r["status"] for r in read_records(files.log) if r.get("kind") == "end"] == [200]


# ---- disk full ----------------------------------------------------------------------------------
DISK_FULL = """
import json, os, resource, signal, sys
from inferd.server.audit import AuditFullError, AuditLog

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
log_path, key, anchor = sys.argv[1:4]
log = AuditLog(log_path, key, anchor)
log.begin("before", {"route": "/v1/completions"}).result(10)
log.begin("streaming", {"route": "/v1/completions"}).result(10)
size = os.fstat(log._fd).st_size
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 60, hard))  # the next frame is cut short
out = {}
for name, fut in (("begin", lambda: log.begin("refused", {"route": "/v1/completions"})),
                  ("end", lambda: log.end("streaming", status=200, completion_tokens=7))):
    try:
        fut().result(10)
        out[name] = "written"
    except AuditFullError as e:
        out[name] = str(e)
out["size_while_full"] = os.path.getsize(log_path)
out["size_before"] = size
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
log.begin("after", {"route": "/v1/completions"}).result(10)
log.end("after", status=200).result(10)
log.close()
print(json.dumps(out))
"""


def test_a_transient_disk_full_leaves_an_explained_gap_and_a_chain_that_verifies(files):
    """v1: the failed bytes stayed buffered and the sequence advanced: records written late, a
    gap, `verify` reporting deleted records and the server refusing to start."""
    files.log.parent.mkdir(parents=True)
    r = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(files.log), str(files.key), str(files.anchor)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "could not be written" in out["begin"] and "could not be written" in out["end"], out
    assert out["size_while_full"] == out["size_before"], "the short write was cut back to the last whole frame"
    v = files.verify()
    assert v.returncode == 0, v.stderr
    assert "could not be written" in v.stdout and "1 records refused" in v.stdout, v.stdout
    assert "0 requests interrupted" in v.stdout, v.stdout
    records = read_records(files.log)
    assert "refused" not in {r.get("request_id") for r in records if r.get("kind") == "begin"}
    (end,) = [r for r in records if r.get("kind") == "end" and r["request_id"] == "streaming"]
    assert end["completion_tokens"] == 7 and end["delayed"], "the end says its write was delayed"
    files.open().close()  # and the server starts again


def test_a_full_audit_ring_refuses_after_a_short_wait(files, monkeypatch):
    log = files.open(ring_size=2, full_timeout=0.2)
    gate, write = threading.Event(), os.write

    def stalled_write(fd, data):  # a disk that stalls
        if fd == log._fd:
            gate.wait(5)
        return write(fd, data)

    monkeypatch.setattr(os, "write", stalled_write)
    first = log.submit({"n": 0})  # taken by the writer, which now blocks in write()
    time.sleep(0.1)
    log.submit({"n": 1})
    log.submit({"n": 2})  # the ring (2) is full now
    with pytest.raises(AuditFullError, match="behind"):
        log.submit({"n": 3})
    gate.set()
    first.result(5)
    log.close()
    assert [r["n"] for r in read_records(files.log) if "n" in r] == [0, 1, 2]


# ---- segments and retention ----------------------------------------------------------------------
def test_segments_rotate_and_chain_and_a_missing_one_is_named(files):
    log = files.open(segment_bytes=4096)
    fill(log, 40)
    log.close()
    segments = rotated_segments(files.log)
    assert len(segments) >= 3
    assert files.verify().returncode == 0
    segments[1][1].unlink()
    r = files.verify()
    assert r.returncode == 1 and f"segment {segments[1][0]} missing" in r.stderr, r.stderr


def test_retention_deletes_old_segments_and_the_rest_still_verifies(files):
    log = files.open(segment_bytes=4096, retention_days=1)
    fill(log, 30, "old")
    old = rotated_segments(files.log)
    assert len(old) >= 2
    long_ago = time.time() - 3 * 86400
    for _, p in old:
        os.utime(p, (long_ago, long_ago))
    fill(log, 30, "new")  # the next rotation applies the retention
    log.close()
    kept = {n for n, _ in rotated_segments(files.log)}
    assert not kept & {n for n, _ in old}
    r = files.verify()
    assert r.returncode == 0 and f"segments through {old[-1][0]} were deleted by retention" in r.stdout, r.stdout + r.stderr
    # Retention deleted segments up to N; deleting N+1 as well is not retention.
    rotated_segments(files.log)[0][1].unlink()
    r = files.verify()
    assert r.returncode == 1 and "no retention record explains" in r.stderr, r.stderr


def test_a_v1_log_is_moved_aside_and_the_new_chain_names_it(files):
    """A v1 log (unkeyed, one file) is kept untouched as evidence beside the new chain."""
    files.log.parent.mkdir(parents=True)
    data, prev = b"", "0" * 64
    for seq in range(3):
        body = json.dumps({"seq": seq, "prev": prev, "route": "/x"}, sort_keys=True, separators=(",", ":")).encode()
        data += struct.pack("<II", len(body), zlib.crc32(body)) + body
        prev = hashlib.sha256(body).hexdigest()
    files.log.write_bytes(data)
    r = files.verify()
    assert r.returncode == 3 and "v1 format, 3 records" in r.stderr, r.stderr
    files.open().close()
    moved = files.log.with_name("audit.log.v1")
    assert moved.read_bytes() == data
    first = read_records(files.log)[0]
    assert first["v1_records"] == 3 and first["v1_last_hash"] == prev
    assert files.verify().returncode == 0


# ---- reading only what is needed -----------------------------------------------------------------
def bytes_read() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_start_up_and_a_page_read_only_the_tail(files):
    """v1 read the whole log at start-up and on every /admin/logs (1.5 s at 150k records)."""
    log = files.open()
    queued = [log.begin(f"r{i}", {"route": "/v1/completions", "key_id": "k"}) for i in range(3000)]
    queued[-1].result(60)  # group commit: a few large batches
    log.close()
    size = files.log.stat().st_size
    assert size > 400_000
    before = bytes_read()
    log = files.open()
    assert bytes_read() - before < 16_384, "start-up read more than the anchor and the tail"
    before = bytes_read()
    page = log.read_page(10)
    assert bytes_read() - before < 16_384
    assert [r["seq"] for r in page["records"]] == list(range(page["records"][-1]["seq"] - 9, page["records"][-1]["seq"] + 1))
    log.close()


def test_pages_walk_back_over_every_segment_to_the_first_record(files):
    log = files.open(segment_bytes=4096)
    fill(log, 40)
    pages, cursor = [], None
    while True:
        page = log.read_page(7, cursor)
        pages = page["records"] + pages
        cursor = page["next_before"]
        if cursor is None:
            break
    assert [r["seq"] for r in pages] == list(range(len(pages)))
    assert pages == read_records(files.log)
    with pytest.raises(ValueError, match="cursor"):
        log.read_page(5, "not-a-cursor")
    log.close()


def test_verify_reads_the_report_from_the_library_too(files):
    log = files.open()
    fill(log, 2)
    log.close()
    from inferd.server.audit_format import load_key

    report = verify(files.log, load_key(files.key), files.anchor)
    assert report.records == len(read_records(files.log)) and not report.interrupted


def test_admin_logs_reads_off_the_event_loop(llama_dir, tmp_path, monkeypatch):
    """v1 parsed the whole log on the event loop: every request waited (1.5 s at 150k records)."""
    import asyncio

    from fastapi.testclient import TestClient

    from inferd.server.app import create_app
    from inferd.server.auth import KeyStore
    from inferd.server.config import ServerConfig

    cfg = ServerConfig(model=str(llama_dir), data_dir=str(tmp_path))
    key = KeyStore(cfg.keys_path).add("olivia", "ops")
    threads, read_page = [], AuditLog.read_page

    def spied(self, *args):
        try:
            asyncio.get_running_loop()
            threads.append("event loop")
        except RuntimeError:
            threads.append("worker")
        return read_page(self, *args)

    monkeypatch.setattr(AuditLog, "read_page", spied)
    with TestClient(create_app(cfg, load_model=False)) as client:
        r = client.get("/admin/logs", params={"limit": 2}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and len(r.json()["records"]) == 2 and r.json()["next_before"]
    assert threads == ["worker"]


def test_an_edited_anchor_is_detected(files):
    fill(files.open(), 1)
    doc = json.loads(files.anchor.read_text())
    doc["head"]["seq"] -= 1
    files.anchor.write_text(json.dumps(doc))
    r = files.verify()
    assert r.returncode == 1 and "anchor" in r.stderr and "MAC mismatch" in r.stderr, r.stderr
