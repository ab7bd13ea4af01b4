"""Pack, verify, unpack and stream packed models.

Layout of a packed model directory:
    manifest.json      format version, model id and version, every file: size, sha256 of its
                       plaintext, per-file salt, and its chunk table (sizes, sha256 of each stored chunk)
    manifest.sig       Ed25519 signature of manifest.json's exact bytes (optional)
    data/<name>.ipk    the file's chunks, each zstd-compressed then AES-256-GCM sealed, back to back

Memory stays bounded whatever the model size: chunks stream through a small window of worker
threads (zstd and AES release the GIL), in order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard

from inferd.store import crypto

FORMAT = "inferd-pack/1"
DEFAULT_CHUNK = 8 << 20
MANIFEST, SIGNATURE, DATA = "manifest.json", "manifest.sig", "data"


class PackError(ValueError):
    """Something about a packed model does not hold; the message names the file and chunk."""


def key_id(master: bytes, model_id: str) -> str:
    """A public fingerprint of the master key for this model, so a wrong key is named as such."""
    return hmac.new(master, b"inferd-pack/1 key id\0" + model_id.encode(), hashlib.sha256).hexdigest()[:16]


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _ordered(pool: ThreadPoolExecutor, fn, items, window: int) -> Iterator:
    """map() that keeps at most `window` items in flight and yields results in order."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False)


# ---- pack -----------------------------------------------------------------------------------
def pack(
    src: str | Path,
    out: str | Path,
    *,
    model_id: str | None = None,
    model_version: str = "1",
    compress: bool = True,
    master: bytes | None = None,
    signing_key: bytes | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> dict:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PackError(f"{src} is not a directory")
    if out.exists() and any(out.iterdir()):
        raise PackError(f"{out} exists and is not empty: pick a new output directory")
    model_id = model_id or src.name
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    if not names:
        raise PackError(f"{src} holds no files")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    (tmp / DATA).mkdir(parents=True)
    manifest = {
        "format": FORMAT,
        "model_id": model_id,
        "model_version": model_version,
        "created": int(time.time()),
        "chunk_size": chunk_size,
        "compression": "zstd" if compress else "none",
        "encryption": {"cipher": "AES-256-GCM", "kdf": "HKDF-SHA256", "key_id": key_id(master, model_id)} if master else None,
        "files": [],
    }
    total = sum((src / n).stat().st_size for n in names)
    try:
        with ThreadPoolExecutor(_workers()) as pool, _progress(total, "pack", progress) as bar:
            for name in names:
                manifest["files"].append(
                    _pack_file(pool, src / name, tmp / DATA / (name + ".ipk"), name, model_id, compress, master, chunk_size, bar)
                )
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        (tmp / MANIFEST).write_bytes(body)
        if signing_key:
            (tmp / SIGNATURE).write_bytes(crypto.sign(signing_key, body))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _pack_file(
    pool, path: Path, dest: Path, name: str, model_id: str, compress: bool, master: bytes | None, chunk_size: int, bar
) -> dict:
    size = path.stat().st_size
    count = max(1, -(-size // chunk_size))
    salt = secrets.token_bytes(16)
    fkey = crypto.derive_file_key(master, salt, model_id, name) if master else None

    def encode(index: int, data: bytes) -> tuple[bytes, int]:
        # A compressor per call: zstd contexts must not be shared between threads.
        stored = zstandard.ZstdCompressor(level=3).compress(data) if compress else data
        if fkey:
            stored = crypto.seal(fkey, model_id, name, index, index == count - 1, stored)
        return stored, len(data)

    digest = hashlib.sha256()

    def chunks():
        with open(path, "rb") as f:
            for i in range(count):
                data = f.read(chunk_size)
                digest.update(data)  # read and hashed in order, here in the calling thread
                yield i, data

    table = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f_out:
        for stored, plain_len in _ordered(pool, encode, chunks(), 2 * _workers()):
            f_out.write(stored)
            table.append({"plain": plain_len, "stored": len(stored), "sha256": hashlib.sha256(stored).hexdigest()})
            bar.update(plain_len)
        f_out.flush()
        os.fsync(f_out.fileno())
    return {"name": name, "size": size, "sha256": digest.hexdigest(), "salt": salt.hex(), "chunks": table}


# ---- read -----------------------------------------------------------------------------------
class PackedModel:
    def __init__(
        self, path: str | Path, master: bytes | None = None, public_key: bytes | None = None, require_signature: bool = False
    ):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise PackError(f"{self.path} is not a packed model ({MANIFEST} missing)")
        self.manifest_bytes = mpath.read_bytes()
        sig = self.path / SIGNATURE
        self.signed = False
        if public_key is not None:
            if not sig.exists():
                raise PackError(f"{self.path}: the manifest is not signed, and a public key was given: refusing it")
            if not crypto.verify_signature(public_key, self.manifest_bytes, sig.read_bytes()):
                raise PackError(
                    f"{self.path}: manifest signature does not verify with this public key "
                    "(another signer, or the manifest was changed)"
                )
            self.signed = True
        elif require_signature:
            raise PackError("a signature is required: pass the signer's public key")
        try:
            self.manifest = json.loads(self.manifest_bytes)
        except ValueError:
            raise PackError(f"{mpath} is not valid JSON") from None
        if self.manifest.get("format") != FORMAT:
            raise PackError(f"{mpath}: format {self.manifest.get('format')!r} is not {FORMAT!r}")
        self.model_id = self.manifest["model_id"]
        self.files = {f["name"]: f for f in self.manifest["files"]}
        self.master = master
        enc = self.manifest.get("encryption")
        if enc and master is not None and not hmac.compare_digest(enc["key_id"], key_id(master, self.model_id)):
            raise PackError(f"wrong key: this model was packed with key id {enc['key_id']}, the given key has another")
        if enc and master is None:
            self._needs_key = True
        else:
            self._needs_key = False

    def check_file_set(self) -> None:
        """The data files on disk are exactly the manifest's."""
        data = self.path / DATA
        on_disk = {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()} if data.exists() else set()
        expected = {n + ".ipk" for n in self.files}
        missing, extra = sorted(expected - on_disk), sorted(on_disk - expected)
        if missing:
            raise PackError(f"{missing[0]}: listed in the manifest but missing (deleted or renamed)")
        if extra:
            raise PackError(f"{extra[0]}: not in the manifest (an extra or renamed file)")
        for name, f in self.files.items():
            size = (data / (name + ".ipk")).stat().st_size
            want = sum(c["stored"] for c in f["chunks"])
            if size != want:
                raise PackError(f"{name}: packed file is {size} bytes, the manifest says {want} (truncated or extended)")

    def _stored_chunks(self, name: str) -> Iterator[tuple[int, bytes]]:
        f = self.files[name]
        with open(self.path / DATA / (name + ".ipk"), "rb") as fh:
            for i, c in enumerate(f["chunks"]):
                data = fh.read(c["stored"])
                if len(data) != c["stored"]:
                    raise PackError(f"{name}: truncated at chunk {i}")
                yield i, data

    def _check_stored(self, name: str, index: int, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != self.files[name]["chunks"][index]["sha256"]:
            raise PackError(f"{name}: chunk {index} does not match the manifest (changed, swapped or copied from elsewhere)")

    def iter_chunks(self, name: str, pool: ThreadPoolExecutor | None = None) -> Iterator[bytes]:
        """The file's plaintext, chunk by chunk, checked against the manifest's digest at the end."""
        if name not in self.files:
            raise PackError(f"{name} is not in this packed model")
        if self._needs_key:
            raise PackError(
                "this model is encrypted: a key is needed (--key-file, $INFERD_MODEL_KEY_FILE or the systemd credential)"
            )
        f = self.files[name]
        count = len(f["chunks"])
        fkey = (
            crypto.derive_file_key(self.master, bytes.fromhex(f["salt"]), self.model_id, name)
            if self.manifest.get("encryption")
            else None
        )
        compressed = self.manifest["compression"] == "zstd"

        def decode(index: int, data: bytes) -> bytes:
            self._check_stored(name, index, data)
            if fkey:
                data = crypto.open_sealed(fkey, self.model_id, name, index, index == count - 1, data)
            if compressed:
                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=f["chunks"][index]["plain"])
            if len(data) != f["chunks"][index]["plain"]:
                raise PackError(f"{name}: chunk {index} has the wrong size after decoding")
            return data

        own = pool is None
        pool = pool or ThreadPoolExecutor(_workers())
        # The whole-file digest is serial by nature: one thread of its own runs it (hashlib lets
        # go of the GIL), a bounded number of chunks behind the consumer.
        hasher = ThreadPoolExecutor(1)
        hashing: deque = deque()
        digest, size = hashlib.sha256(), 0
        try:
            for plain in _ordered(pool, decode, self._stored_chunks(name), 2 * _workers()):
                hashing.append(hasher.submit(digest.update, plain))
                if len(hashing) > 2 * _workers():
                    hashing.popleft().result()
                size += len(plain)
                yield plain
            for h in hashing:
                h.result()
        except crypto.DecryptError as e:
            raise PackError(str(e)) from None
        finally:
            hasher.shutdown(wait=True, cancel_futures=True)
            if own:
                pool.shutdown(wait=False, cancel_futures=True)
        if size != f["size"] or digest.hexdigest() != f["sha256"]:
            raise PackError(f"{name}: plaintext does not match the manifest's sha256")

    def read_bytes(self, name: str) -> bytes:
        return b"".join(self.iter_chunks(name))

    def verify(self, deep: bool, progress: bool = False) -> int:
        """Check the file set and every chunk; with deep (needs the key if encrypted), also
        decrypt, decompress and check every plaintext digest. Returns the number of files."""
        self.check_file_set()
        total = sum(f["size"] for f in self.files.values())
        with ThreadPoolExecutor(_workers()) as pool, _progress(total, "verify", progress) as bar:
            for name in sorted(self.files):
                if deep:
                    for chunk in self.iter_chunks(name, pool):
                        bar.update(len(chunk))
                else:
                    for i, data in self._stored_chunks(name):
                        self._check_stored(name, i, data)
        return len(self.files)

    def unpack(self, out: str | Path, progress: bool = False) -> None:
        """Write every file to `out`: each goes to a temporary name and is renamed into place only
        after its last chunk is written and its digest checks out."""
        out = Path(out)
        self.check_file_set()
        out.mkdir(parents=True, exist_ok=True)
        total = sum(f["size"] for f in self.files.values())
        with ThreadPoolExecutor(_workers()) as pool, _progress(total, "unpack", progress) as bar:
            for name in sorted(self.files):
                final = out / name
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
                try:
                    with open(tmp, "wb") as fh:
                        for chunk in self.iter_chunks(name, pool):
                            fh.write(chunk)
                            bar.update(len(chunk))
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, final)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    if e.errno == 28:
                        raise PackError(f"disk full while writing {final}: free space on {out} or unpack elsewhere") from None
                    raise
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise


def is_packed(path: str | Path) -> bool:
    p = Path(path) / MANIFEST
    if not p.exists():
        return False
    try:
        return json.loads(p.read_bytes()).get("format") == FORMAT
    except ValueError:
        return False
