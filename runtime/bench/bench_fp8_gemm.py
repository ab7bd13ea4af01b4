"""Where an fp8 linear layer's time goes at decode and prefill sizes, for the R1-Distill-Llama-8B
projections: bf16 `F.linear` against `torch._scaled_mm` with row-wise scales (CUTLASS) and with
tensor-wise scales (cuBLAS), and the elementwise kernels around them (per-token activation
quantization, scaling the product). Each op is captured 32 times in one CUDA graph (one per layer,
as in a decode step) and timed by replaying it; results in microseconds per call.

    python runtime/bench/bench_fp8_gemm.py --out fp8_gemm.json     # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import graph_us  # noqa: E402  (this directory is on sys.path when run as a script)

from inferd.layers.quant import quantize_rows, quantize_weight, scale_product  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def measure(name: str, w: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, m: int) -> dict:
    n, k = w.shape
    one = torch.ones((), device=w.device)
    x = torch.randn(m, k, device=w.device, dtype=torch.bfloat16)
    xq, xs = quantize_rows(x)
    xs_t = xs.amax().reshape(())
    prod = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    r = {"proj": name, "n": n, "k": k, "m": m, "weight_MB_bf16": n * k * 2 / 1e6}
    r["bf16_linear"] = graph_us(lambda: F.linear(x, w))
    r["quantize_rows"] = graph_us(lambda: quantize_rows(x))
    r["scaled_mm_rowwise"] = graph_us(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16))
    r["scaled_mm_tensorwise"] = graph_us(
        lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs_t, scale_b=one, out_dtype=torch.bfloat16)
    )
    # The same product with the operands swapped, (Wq Xq^T)^T: cuBLAS picks its kernel for a
    # problem whose small side is N rather than M.
    r["scaled_mm_swapped"] = graph_us(lambda: torch._scaled_mm(wq, xq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    r["scale_product"] = graph_us(lambda: scale_product(prod, xs, ws, None))
    # GB/s of weight bytes streamed by each GEMM
    r["bf16_GB_s"] = n * k * 2 / r["bf16_linear"] / 1e3
    r["rowwise_GB_s"] = n * k / r["scaled_mm_rowwise"] / 1e3
    r["tensorwise_GB_s"] = n * k / r["scaled_mm_tensorwise"] / 1e3
    r["swapped_GB_s"] = n * k / r["scaled_mm_swapped"] / 1e3
    r["rowwise_TFLOP_s"] = 2 * m * n * k / r["scaled_mm_rowwise"] / 1e6
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 8192])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": [],
    }
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / 64
        wq, ws = quantize_weight(w)
        for m in args.rows:
            r = measure(name, w, wq, ws, m)
            print(json.dumps(r), flush=True)
            results["rows"].append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
