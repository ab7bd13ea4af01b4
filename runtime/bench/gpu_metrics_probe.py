"""Read the server's NVML/GPM metrics while the GPU works, and print them in Prometheus text
format (the values BENCHMARKS.md records). Workloads: `copy` (device-to-device copies, the
bandwidth ceiling) or `decode` (our engine decoding 64 concurrent requests of 256 prompt tokens
on random weights in a benchmark shape, the way the server runs it).

    python bench/gpu_metrics_probe.py --workload decode --shape llama-8b"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inferd.server.metrics import GpuCollector  # noqa: E402


def decode_engine(shape: str):
    """Our engine on random weights in a benchmark shape (handed over in memory, as bench_engine does)."""
    import tempfile

    from bench.bench_engine import SHAPES, build_hf_model

    from inferd.config import EngineConfig
    from inferd.engine.llm_engine import LLMEngine

    tmp = Path(tempfile.mkdtemp())
    hf = build_hf_model(SHAPES[shape], "cuda", torch.bfloat16, tmp)
    state = {k: v.to("cpu") for k, v in hf.state_dict().items()}
    del hf
    torch.cuda.empty_cache()
    config = EngineConfig(model=str(tmp), device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=64)
    return LLMEngine(config, weights=iter(state.items()))


def busy_decode(engine, stop: threading.Event) -> None:
    from inferd.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=512, temperature=0.0, ignore_eos=True)
    while not stop.is_set():
        for i in range(64):
            engine.add_request([1 + (i * 7 + j) % 1000 for j in range(256)], sp)
        while engine.has_unfinished_requests() and not stop.is_set():
            engine.step()


def busy(stop: threading.Event) -> None:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    while not stop.is_set():
        for _ in range(50):
            b.copy_(a)
        torch.cuda.synchronize()


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["copy", "decode"], default="copy")
    ap.add_argument("--shape", default="qwen-1.5b", help="model shape for --workload decode (bench_engine.SHAPES)")
    args = ap.parse_args()
    gpu = GpuCollector()
    print("available:", gpu.available)
    if not gpu.available:
        return 1
    reg = CollectorRegistry()
    reg.register(gpu)
    stop = threading.Event()
    engine = decode_engine(args.shape) if args.workload == "decode" else None
    generate_latest(reg)  # first GPM sample, once the engine is built and its graphs captured
    if engine is not None:
        t = threading.Thread(target=busy_decode, args=(engine, stop))
    else:
        t = threading.Thread(target=busy, args=(stop,))
    t.start()
    time.sleep(5 if engine is not None else 2)
    generate_latest(reg)
    time.sleep(3 if engine is not None else 1)
    text = generate_latest(reg).decode()
    stop.set()
    t.join()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
