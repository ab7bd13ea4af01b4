"""Read the server's NVML/GPM metrics while the GPU does bandwidth-heavy work, and print them
in Prometheus text format (the values BENCHMARKS.md records)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inferd.server.metrics import GpuCollector  # noqa: E402


def busy(stop: threading.Event) -> None:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    while not stop.is_set():
        for _ in range(50):
            b.copy_(a)
        torch.cuda.synchronize()


def main() -> int:
    gpu = GpuCollector()
    print("available:", gpu.available)
    if not gpu.available:
        return 1
    reg = CollectorRegistry()
    reg.register(gpu)
    generate_latest(reg)  # first GPM sample
    stop = threading.Event()
    t = threading.Thread(target=busy, args=(stop,))
    t.start()
    time.sleep(2)
    generate_latest(reg)
    time.sleep(1)
    text = generate_latest(reg).decode()
    stop.set()
    t.join()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
