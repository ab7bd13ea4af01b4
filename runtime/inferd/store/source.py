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
    """read(n) over an iterator of chunks, holding at most one chunk plus what is asked for."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.buf, self.pos = chunks, b"", 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if self.pos == len(self.buf):
                self.buf, self.pos = next(self.chunks, b""), 0
                if not self.buf:
                    raise EOFError("unexpected end of file")
            take = min(n - len(out), len(self.buf) - self.pos)
            out += self.buf[self.pos : self.pos + take]
            self.pos += take
        return bytes(out) if n < (1 << 20) else out

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
                data = bytearray(stream.read(end - start))
                pos = end
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                yield tname, tensor.reshape(info["shape"])
            stream.drain()


def open_model(path: str | Path, key_file: str | None = None, public_key: bytes | None = None):
    if is_packed(path):
        from inferd.store.crypto import read_master_key

        manifest = json.loads((Path(path) / "manifest.json").read_text())
        master = read_master_key(key_file) if manifest.get("encryption") else None
        return PackedSource(path, master, public_key)
    return PlainSource(path)
