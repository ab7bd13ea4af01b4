"""Where a model's files come from: a plain Hugging Face directory, or a packed one read through
the store (decrypted in memory, never written to disk)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from inferd.store.packed import PackedModel, is_packed

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class PlainSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read_text(self, name: str) -> str | None:
        p = self.path / name
        return p.read_text() if p.exists() else None

    def weight_bytes(self) -> int:
        from inferd.loader import checkpoint_files

        return sum(f.stat().st_size for f in checkpoint_files(self.path))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from inferd.loader import iter_safetensors

        return iter_safetensors(self.path)


class _Stream:
    """Reads over an iterator of chunks, holding at most one chunk besides the caller's buffer."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.buf, self.pos = chunks, memoryview(b""), 0

    def readinto(self, out: memoryview) -> None:
        """Fill `out` exactly: one copy from each decoded chunk into the destination."""
        done = 0
        while done < len(out):
            if self.pos == len(self.buf):
                self.buf, self.pos = memoryview(next(self.chunks, b"")), 0
                if not len(self.buf):
                    raise EOFError("unexpected end of file")
            take = min(len(out) - done, len(self.buf) - self.pos)
            out[done : done + take] = self.buf[self.pos : self.pos + take]
            done += take
            self.pos += take

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        self.readinto(memoryview(out))
        return bytes(out)

    def drain(self) -> None:
        for _ in self.chunks:  # run the iterator to its end: it checks the file's digest there
            pass


class PackedSource:
    def __init__(self, path: str | Path, master: bytes | None, public_key: bytes | None = None):
        self.packed = PackedModel(path, master=master, public_key=public_key)
        self.packed.check_file_set()

    def read_text(self, name: str) -> str | None:
        return self.packed.read_bytes(name).decode() if name in self.packed.files else None

    def _weight_files(self) -> list[str]:
        index = self.read_text("model.safetensors.index.json")
        if index:
            names = sorted(set(json.loads(index)["weight_map"].values()))
        else:
            names = sorted(n for n in self.packed.files if n.endswith(".safetensors"))
        if not names:
            raise FileNotFoundError(f"no *.safetensors files in packed model {self.packed.path}")
        return names

    def weight_bytes(self) -> int:
        return sum(self.packed.files[n]["size"] for n in self._weight_files())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._weight_files():
            stream = _Stream(self.packed.iter_chunks(name))
            (header_len,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(bytes(stream.read(header_len)))
            header.pop("__metadata__", None)
            pos = 0
            for tname, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                if start > pos:
                    stream.read(start - pos)
                raw = torch.empty(end - start, dtype=torch.uint8)
                stream.readinto(memoryview(raw.numpy()))
                pos = end
                yield tname, raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            stream.drain()


def open_model(path: str | Path, key_file: str | None = None, public_key: bytes | None = None):
    if is_packed(path):
        from inferd.store.crypto import read_master_key

        manifest = json.loads((Path(path) / "manifest.json").read_text())
        master = read_master_key(key_file) if manifest.get("encryption") else None
        return PackedSource(path, master, public_key)
    return PlainSource(path)
