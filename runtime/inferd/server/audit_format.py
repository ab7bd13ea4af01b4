"""The audit log's on-disk format: keyed frames in segments, the anchor, the key, reading.

A segment file starts with MAGIC, then frames:

    u32 body length | u32 crc32(mac + body) | 32-byte mac | body (canonical JSON) | u32 body length

`mac` is HMAC-SHA256 under the audit key (a file only the service can read) of the body, and the
body holds its sequence number and the previous record's mac (`prev`): a record cannot be edited,
dropped from the middle or re-chained without the key. The CRC tells a torn write (crash) from an
edit without the key; the trailing length lets a reader walk frames backward from a known end, so
start-up and the paged `/admin/logs` read only the records they need, not the whole log.

The active segment is `audit.log`; a full one is renamed `audit.log.NNNNNN` (its segment number)
and the next starts with a `segment` record chained to the last mac of the one before. The anchor
(a separate small file, replaced atomically after each write) holds the head: segment, sequence,
mac and end offset. A log that ends before its anchor was truncated.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"inferd-audit v2\n"
HEAD = struct.Struct("<II32s")
TAIL = struct.Struct("<I")
OVERHEAD = HEAD.size + TAIL.size
GENESIS = "0" * 64
MAX_BODY = 1 << 24  # a length beyond this is damage, not a record
KEY_BYTES = 32
SEGMENT_SUFFIX = re.compile(r"\.(\d{6})$")


class AuditVerifyError(ValueError):
    """The log, its anchor or its key is not what was written: the message names what and where."""


class OldFormatError(AuditVerifyError):
    """A v1 log (unkeyed sha256 chain, one file, no anchor)."""


class TornFrame(Exception):
    """The frame at this offset is incomplete: the end of a write cut short by a crash."""


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def mac_of(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """Names a key in the log (a wrong key is reported as such) without revealing it."""
    return hmac.new(key, b"inferd audit key id", hashlib.sha256).hexdigest()[:16]


def encode_frame(key: bytes, record: dict) -> tuple[bytes, str]:
    body = canonical(record)
    mac = mac_of(key, body)
    return HEAD.pack(len(body), zlib.crc32(mac + body), mac) + body + TAIL.pack(len(body)), mac.hex()


# ---- the key ---------------------------------------------------------------------------------
def load_key(path: Path, create: bool = False) -> bytes:
    """The 256-bit chain key, 64 hex digits in `path`. With `create` (the service) a missing key is
    made (0600) and a key that group or others can read is refused."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not create:
            raise AuditVerifyError(
                f"audit key {path} not found: pass the key the service holds (--key-file, or --config)"
            ) from None
        return _create_key(path)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if create and mode & 0o077:
            raise AuditVerifyError(f"audit key {path} has mode {mode:o}: it must be readable by the service only (chmod 600)")
        text = f.read().strip()
    try:
        key = bytes.fromhex(text.decode())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise AuditVerifyError(f"audit key {path} must hold {2 * KEY_BYTES} hex digits (a 256-bit key)")
    return key


def _create_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(path.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash before the link below: never used
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, path)  # fails if another process made a key meanwhile: never two keys
    tmp.unlink()
    fsync_dir(path.parent)
    return key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- frames ----------------------------------------------------------------------------------
@dataclass
class Frame:
    start: int
    end: int
    mac: str
    body: bytes
    record: dict


def read_frame(fd: int, start: int, size: int, where: str = "") -> Frame:
    """The frame at `start` of a file of `size` bytes. TornFrame if it runs past the end;
    AuditVerifyError if its bytes are damaged (the CRC, which needs no key, does not match)."""
    if size - start < HEAD.size:
        raise TornFrame
    length, crc, mac = HEAD.unpack(os.pread(fd, HEAD.size, start))
    end = start + HEAD.size + length + TAIL.size
    if length > MAX_BODY or end > size:
        raise TornFrame
    rest = os.pread(fd, length + TAIL.size, start + HEAD.size)
    body = rest[:length]
    (tail,) = TAIL.unpack(rest[length:])
    here = f"{where}byte offset {start}"
    if zlib.crc32(mac + body) != crc or tail != length:
        raise AuditVerifyError(f"{here}: checksum mismatch: the record was edited or damaged")
    try:
        record = json.loads(body)
    except ValueError:
        raise AuditVerifyError(f"{here}: the record is not valid JSON") from None
    return Frame(start, end, mac.hex(), body, record)


def read_frame_before(fd: int, end: int, where: str = "") -> Frame:
    """The frame that ends at `end` (walking backward)."""
    if end < len(MAGIC) + OVERHEAD:
        raise AuditVerifyError(f"{where}no record ends at byte offset {end}")
    (length,) = TAIL.unpack(os.pread(fd, TAIL.size, end - TAIL.size))
    start = end - OVERHEAD - length
    try:
        frame = read_frame(fd, start, end, where) if start >= len(MAGIC) else None
    except TornFrame:
        frame = None
    if frame is None or frame.end != end:
        raise AuditVerifyError(f"{where}no record ends at byte offset {end}: the log was edited or damaged")
    return frame


def check_mac(key: bytes, frame: Frame, where: str) -> None:
    if hmac.compare_digest(mac_of(key, frame.body), bytes.fromhex(frame.mac)):
        return
    rec = frame.record
    if rec.get("kind") == "segment" and rec.get("key_id") not in (None, key_id(key)):
        raise AuditVerifyError(
            f"{where}: written with another key (key id {rec['key_id']}; this key's id is {key_id(key)}): pass the right key"
        )
    raise AuditVerifyError(f"{where}: MAC mismatch: the record was altered, or written without the key")


# ---- segments --------------------------------------------------------------------------------
def rotated_path(active: Path, number: int) -> Path:
    return active.with_name(f"{active.name}.{number:06d}")


def rotated_segments(active: Path) -> list[tuple[int, Path]]:
    """Rotated segment files, oldest first (the active one, `active` itself, is not among them)."""
    found = []
    if active.parent.is_dir():
        for p in active.parent.glob(active.name + ".*"):
            m = SEGMENT_SUFFIX.search(p.name)
            if m and p.name == f"{active.name}.{m.group(1)}":
                found.append((int(m.group(1)), p))
    return sorted(found)


def open_segment(path: Path) -> tuple[int, int]:
    """(fd, size) of a segment file whose magic is checked."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    head = os.pread(fd, len(MAGIC), 0)
    if head != MAGIC:
        os.close(fd)
        if head[8:9] == b"{":  # v1: u32 length, u32 crc, then a JSON object
            raise OldFormatError(
                f"{path} is a v1 audit log (an unkeyed chain): `inferd audit verify` checks it as such; the server "
                "moves it aside to audit.log.v1 on start-up and starts a keyed log chained to its last record"
            )
        raise AuditVerifyError(f"{path}: not an inferd audit segment (its header is missing or damaged)")
    return fd, size


def segment_number(path: Path) -> int:
    """The number in a segment's first record."""
    fd, size = open_segment(path)
    try:
        rec = read_frame(fd, len(MAGIC), size, f"{path}: ").record
    except TornFrame:
        raise AuditVerifyError(f"{path}: its first record is incomplete") from None
    finally:
        os.close(fd)
    if rec.get("kind") != "segment":
        raise AuditVerifyError(f"{path}: does not start with a segment record")
    return int(rec["segment"])


# ---- the anchor ------------------------------------------------------------------------------
def write_anchor(path: Path, key: bytes, head: dict) -> None:
    """Replace the anchor atomically (a crash leaves the old one or the new one, never half)."""
    doc = {"head": head, "mac": mac_of(key, b"anchor" + canonical(head)).hex()}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, canonical(doc) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_anchor(path: Path, key: bytes) -> dict | None:
    try:
        doc = json.loads(Path(path).read_bytes())
        head = doc["head"]
        mac = bytes.fromhex(doc["mac"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise AuditVerifyError(f"audit anchor {path} is damaged (not the JSON the server writes)") from None
    if not hmac.compare_digest(mac_of(key, b"anchor" + canonical(head)), mac):
        raise AuditVerifyError(f"audit anchor {path}: MAC mismatch: it was altered, or written with another key")
    return head


# ---- reading (no key: the ops view and tests) --------------------------------------------------
def iter_segment(path: Path):
    """Every complete frame of one segment, in order (a torn last frame ends it)."""
    fd, size = open_segment(path)
    try:
        pos = len(MAGIC)
        while pos < size:
            try:
                frame = read_frame(fd, pos, size, f"{path}: ")
            except TornFrame:
                return
            yield frame
            pos = frame.end
    finally:
        os.close(fd)


def read_records(active: str | Path) -> list[dict]:
    """All records still kept, oldest first (reads every segment: for tools and tests; the server
    pages with AuditLog.read_page)."""
    active = Path(active)
    paths = [p for _, p in rotated_segments(active)] + ([active] if active.exists() else [])
    return [f.record for p in paths for f in iter_segment(p)]
