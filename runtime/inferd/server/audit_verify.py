"""`inferd audit verify`: check every kept segment of an audit log with its key and anchor.

It names exactly what is wrong: an edited record (checksum or MAC), a deleted one (a gap in the
sequence), a re-chained or reordered one (MAC and chain), a missing segment, a log shorter than
its anchor (truncation). What the log itself explains is reported, not failed: requests begun and
never ended (the server was killed), records refused while the disk was full (`outage`), segments
deleted by retention (`retention`), a torn last record after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from inferd.server.audit_format import (
    GENESIS,
    MAGIC,
    AuditVerifyError,
    TornFrame,
    check_mac,
    open_segment,
    read_anchor,
    read_frame,
    rotated_segments,
)

V1_HEADER_SIZE = 8


@dataclass
class Report:
    records: int = 0
    segments: list[str] = field(default_factory=list)
    first_seq: int | None = None
    first_prev: str | None = None
    first_segment: int | None = None
    last_seq: int = -1
    last_mac: str = GENESIS
    anchored_seq: int | None = None
    anchored_mac: str | None = None  # the mac the log holds at the anchored sequence number
    open: dict[str, int] = field(default_factory=dict)  # request id -> seq of its begin
    interrupted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    retention: dict | None = None
    torn_tail: bool = False


def verify(active: str | Path, key: bytes, anchor_file: str | Path | None) -> Report:
    """Raises AuditVerifyError naming the first thing missing or altered; returns the report."""
    active = Path(active)
    anchor = read_anchor(Path(anchor_file), key) if anchor_file else None
    paths = [p for _, p in rotated_segments(active)] + ([active] if active.exists() else [])
    if not paths:
        raise AuditVerifyError(f"no audit log at {active} (nor any rotated segment beside it)")
    rep = Report(anchored_seq=anchor and anchor["seq"])
    expected_segment = None
    for i, path in enumerate(paths):
        expected_segment = _verify_segment(path, key, rep, expected_segment, last=i == len(paths) - 1)
    _check_start(rep)
    if anchor is not None:
        _check_anchor(rep, anchor, anchor_file)
    elif anchor_file:
        raise AuditVerifyError(f"the anchor {anchor_file} is missing: whether records were cut off the end cannot be told")
    for rid, seq in rep.open.items():
        rep.interrupted.append(f"request {rid} (begun at record {seq}) has no end: in flight, or the server was killed after it")
    return rep


def _verify_segment(path: Path, key: bytes, rep: Report, expected: int | None, last: bool) -> int:
    """Check one segment's frames into `rep`; return the number the next segment must have."""
    fd, size = open_segment(path)
    rep.segments.append(path.name)
    try:
        pos, number = len(MAGIC), None
        while pos < size:
            try:
                frame = read_frame(fd, pos, size, f"{path}: ")
            except TornFrame:
                if not last:
                    raise AuditVerifyError(f"{path}: ends with an incomplete record at byte offset {pos}") from None
                rep.torn_tail = True
                break
            rec = frame.record
            where = f"{path}: record {rec.get('seq')} (byte offset {pos})"
            check_mac(key, frame, where)
            if number is None:
                number = _check_segment_start(rec, expected, path, rep)
            _check_chain(rec, rep, where)
            _account(rec, rep)
            rep.last_seq, rep.last_mac = rec["seq"], frame.mac
            if rec["seq"] == rep.anchored_seq:
                rep.anchored_mac = frame.mac
            rep.records += 1
            pos = frame.end
    finally:
        os.close(fd)
    if number is None:
        raise AuditVerifyError(f"{path}: holds no complete record")
    return number + 1


def _check_segment_start(rec: dict, expected: int | None, path: Path, rep: Report) -> int:
    if rec.get("kind") != "segment":
        raise AuditVerifyError(f"{path}: does not start with its segment record: its beginning was removed")
    number = rec["segment"]
    if expected is not None and number != expected:
        missing = f"segment {expected}" if number == expected + 1 else f"segments {expected}..{number - 1}"
        raise AuditVerifyError(f"{path} is segment {number}: {missing} missing")
    if rep.first_segment is None:
        rep.first_segment, rep.first_seq, rep.first_prev = number, rec["seq"], rec["prev"]
        if rec.get("v1_log"):
            rep.notes.append(
                f"the chain continues a v1 log, {rec['v1_log']} ({rec['v1_records']} records, last hash "
                f"{rec['v1_last_hash']}): verify that file on its own"
            )
    return number


def _check_chain(rec: dict, rep: Report, where: str) -> None:
    if rep.records == 0:
        return  # the first record kept: checked against the retention record at the end
    if rec.get("seq") != rep.last_seq + 1:
        raise AuditVerifyError(
            f"{where}: sequence jumps from {rep.last_seq} to {rec.get('seq')}: records were deleted or reordered (a gap)"
        )
    if rec.get("prev") != rep.last_mac:
        raise AuditVerifyError(f"{where}: chain broken: the record before it was replaced, or it was moved here")


def _account(rec: dict, rep: Report) -> None:
    kind, seq = rec.get("kind"), rec["seq"]
    if kind == "begin":
        rep.open[rec["request_id"]] = seq
    elif kind == "end":
        rep.open.pop(rec["request_id"], None)
    elif kind == "start" and rec.get("previous_shutdown") == "unclean":
        for rid, begun in rep.open.items():
            rep.interrupted.append(
                f"request {rid} (begun at record {begun}) has no end: the server was killed or crashed "
                f"(the restart at record {seq} found no clean shutdown)"
            )
        rep.open.clear()
    elif kind == "outage":
        rep.notes.append(
            f"record {seq}: the log could not be written from ts {rec['from_ts']:.0f} to {rec['to_ts']:.0f} "
            f"({rec['error']}): {rec['refused']} records refused (their requests were answered 503, not served)"
        )
    elif kind == "retention":
        rep.retention = rec


def _check_start(rep: Report) -> None:
    """The first segment kept is segment 1, or the one after those a retention record deleted."""
    if rep.first_segment == 1:
        if rep.first_seq != 0 or rep.first_prev != GENESIS:
            raise AuditVerifyError("segment 1 does not start the chain (record 0 after the genesis value)")
        return
    ret = rep.retention
    if ret is None or ret["through_segment"] < rep.first_segment - 1:
        gone = f"segments 1..{rep.first_segment - 1}"
        if ret is not None:
            gone = f"segments {ret['through_segment'] + 1}..{rep.first_segment - 1}"
        raise AuditVerifyError(f"{gone} are missing and no retention record explains their deletion")
    if ret["through_segment"] == rep.first_segment - 1 and (
        ret["last_mac"] != rep.first_prev or ret["last_seq"] != rep.first_seq - 1
    ):
        raise AuditVerifyError(
            f"segment {rep.first_segment} does not follow the last record that retention deleted (record {ret['last_seq']})"
        )
    rep.notes.append(f"segments through {ret['through_segment']} were deleted by retention (a record says so)")


def _check_anchor(rep: Report, anchor: dict, anchor_file) -> None:
    seq = anchor["seq"]
    if rep.last_seq < seq:
        raise AuditVerifyError(
            f"the log ends at record {rep.last_seq} but its anchor {anchor_file} says record {seq}: "
            f"records {rep.last_seq + 1}..{seq} were removed (the log was truncated)"
        )
    if rep.anchored_mac != anchor["mac"]:
        raise AuditVerifyError(f"record {seq} is not the one its anchor {anchor_file} holds: the log was rewritten")
    if rep.last_seq > seq:
        rep.notes.append(f"records {seq + 1}..{rep.last_seq} came after the last anchor update (a crash before it)")


# ---- v1 (one file, unkeyed sha256 chain) -------------------------------------------------------
@dataclass
class V1Result:
    records: int
    last_hash: str
    torn_tail: bool


def scan_v1(path: str | Path) -> V1Result:
    """The v1 check: CRC, sequence and sha256 chain (no key, no anchor)."""
    data = Path(path).read_bytes()
    pos, seq, prev = 0, -1, GENESIS
    while pos < len(data):
        if len(data) - pos < V1_HEADER_SIZE:
            return V1Result(seq + 1, prev, True)
        length = int.from_bytes(data[pos : pos + 4], "little")
        crc = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + V1_HEADER_SIZE : pos + V1_HEADER_SIZE + length]
        if len(body) < length:
            return V1Result(seq + 1, prev, True)
        where = f"{path}: record {seq + 1} (byte offset {pos})"
        if zlib.crc32(body) != crc:
            raise AuditVerifyError(f"{where}: checksum mismatch: the record was edited or damaged")
        rec = json.loads(body)
        if rec.get("seq") != seq + 1 or rec.get("prev") != prev:
            raise AuditVerifyError(f"{where}: sequence or chain broken: records were deleted, edited or reordered (a gap)")
        prev, seq = hashlib.sha256(body).hexdigest(), rec["seq"]
        pos += V1_HEADER_SIZE + length
    return V1Result(seq + 1, prev, False)
