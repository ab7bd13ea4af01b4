"""Time from process start to the first generated token, and peak host RSS, for one model shape
loaded three ways: (a) HF `from_pretrained` on the plain safetensors directory, (b) our loader on
the same directory, (c) our loader on the packed (zstd + AES-256-GCM + signed) model.

    python runtime/bench/bench_load.py --shape qwen-1.5b --workdir /tmp/load-bench --out results.json

Each measurement runs in a fresh process started by this script; its clock starts before the
child's interpreter does. Random weights: they compress differently (worse) than trained ones."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, re, sys, time
mode, path = sys.argv[1], sys.argv[2]
import torch
if mode == "hf":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    m.generate(torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=1, do_sample=False)
else:
    sys.path.insert(0, os.environ["INFERD_RUNTIME"])
    import logging
    logging.basicConfig(level=logging.INFO)
    from inferd import LLM, SamplingParams
    LLM(path, device="cuda", dtype="bfloat16", max_model_len=4096, max_num_seqs=16).generate(
        [[1, 2, 3]], SamplingParams(max_tokens=1, temperature=0.0))
torch.cuda.synchronize()
print("FIRST_TOKEN", time.time(), re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1), flush=True)
"""


def prepare(shape: str, work: Path) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(RUNTIME))
    import torch
    from bench.bench_engine import SHAPES, build_hf_model

    from inferd.store import crypto
    from inferd.store.packed import pack

    plain, packed, key = work / "plain", work / "packed", work / "model.key"
    plain.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = build_hf_model(SHAPES[shape], "cuda", torch.bfloat16, plain)
    model.save_pretrained(plain)
    del model
    torch.cuda.empty_cache()
    print(f"saved {shape} in {time.perf_counter() - t:.1f}s", flush=True)
    master = crypto.new_master_key()
    key.write_bytes(master.hex().encode())
    private, _ = crypto.new_signing_key()
    t = time.perf_counter()
    m = pack(plain, packed, master=master, signing_key=private)
    plain_bytes = sum(f["size"] for f in m["files"])
    stored = sum(c["stored"] for f in m["files"] for c in f["chunks"])
    print(f"packed {plain_bytes / 1e9:.2f} GB -> {stored / 1e9:.2f} GB in {time.perf_counter() - t:.1f}s", flush=True)
    return plain, packed, key


def measure(mode: str, path: Path, key: Path) -> dict:
    env = dict(os.environ, INFERD_RUNTIME=str(RUNTIME), INFERD_MODEL_KEY_FILE=str(key))
    subprocess.run(["sync"])
    start = time.time()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, "hf" if mode == "hf" else "inferd", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    m = re.search(r"FIRST_TOKEN (\S+) (\d+)", r.stdout)
    if not m:
        return {"error": (r.stderr or r.stdout)[-600:]}
    result = {"seconds_to_first_token": round(float(m.group(1)) - start, 2), "peak_rss_GiB": round(int(m.group(2)) / 2**20, 2)}
    loaded = re.search(r"loaded: .* in ([\d.]+)s \(([\d.]+) GB/s\)", r.stderr)
    if loaded:  # our loader's own log line: weights only, before KV sizing, compile and graph capture
        result["weights_loaded_seconds"], result["weights_GB_per_s"] = float(loaded.group(1)), float(loaded.group(2))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen-1.5b")
    ap.add_argument("--workdir", default="/tmp/inferd-load-bench")
    ap.add_argument("--out")
    args = ap.parse_args()
    plain, packed, key = prepare(args.shape, Path(args.workdir))
    results = {"shape": args.shape, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for label, mode, path in (
        ("a_hf_from_pretrained", "hf", plain),
        ("b_inferd_plain", "inferd", plain),
        ("c_inferd_packed", "inferd", packed),
    ):
        results[label] = measure(mode, path, key)
        print(label, results[label], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
