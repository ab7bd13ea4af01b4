"""Packed-model format throughput and compression on this machine.

    python runtime/bench/bench_store.py [--gib 1] [--workdir /tmp/store-bench]

Makes a safetensors file of random bf16 weights (normal, std 0.02: what a random-init model
holds), then times pack (zstd + AES-256-GCM + signature), verify (with the key: every digest),
and unpack, through the same library code the CLI uses."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inferd.store import crypto  # noqa: E402
from inferd.store.packed import PackedModel, pack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--workdir", default="/tmp/inferd-store-bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    src.mkdir(parents=True)
    n = int(args.gib * (1 << 30) / 2)
    rows = 4096
    torch.manual_seed(0)
    save_file({"w": (torch.randn(n // rows, rows) * 0.02).to(torch.bfloat16)}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    size = (src / "model.safetensors").stat().st_size
    master = crypto.new_master_key()
    private, public = crypto.new_signing_key()
    results = {"file_bytes": size, "cpus": __import__("os").cpu_count()}
    for label, compress, key in (("zstd+aes", True, master), ("aes only", False, master), ("zstd only", True, None)):
        out = work / label.replace(" ", "_").replace("+", "_")
        t = time.perf_counter()
        m = pack(src, out, compress=compress, master=key, signing_key=private)
        t_pack = time.perf_counter() - t
        stored = sum(c["stored"] for f in m["files"] for c in f["chunks"])
        pm = PackedModel(out, master=key, public_key=public)
        t = time.perf_counter()
        pm.verify(deep=True)
        t_verify = time.perf_counter() - t
        t = time.perf_counter()
        pm.unpack(work / "unpacked")
        t_unpack = time.perf_counter() - t
        shutil.rmtree(work / "unpacked")
        results[label] = {
            "ratio": round(size / stored, 4),
            "pack_MB_s": round(size / t_pack / 1e6, 1),
            "verify_MB_s": round(size / t_verify / 1e6, 1),
            "unpack_MB_s": round(size / t_unpack / 1e6, 1),
        }
        print(label, results[label], flush=True)
    print(json.dumps(results))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
