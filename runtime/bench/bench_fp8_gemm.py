"""Where an fp8 linear layer's time goes at decode and prefill sizes, for the R1-Distill-Llama-8B
projections: bf16 `F.linear` against `torch._scaled_mm` with row-wise scales (CUTLASS) and with
tensor-wise scales (cuBLAS), a split-K Triton candidate for decode sizes, and the elementwise
kernels around them (per-token activation quantization, scaling the product).

Each op is captured 32 times in one CUDA graph, one call per layer as in a decode step, and timed
by replaying it; results in microseconds per call. Each of the 32 calls reads its own copy of the
weights (`--layers`), so they stream from HBM as in a decode step: with one copy, a projection of
up to ~40 MB (qkv, o) stays in the H200's 50 MB L2 between calls and times faster than the engine
can ever run it.

    python runtime/bench/bench_fp8_gemm.py --out fp8_gemm.json     # on the GPU machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import graph_us  # noqa: E402  (this directory is on sys.path when run as a script)

from inferd.layers.quant import quantize_rows, quantize_weight, scale_product  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@triton.jit
def _fp8_splitk_kernel(
    x_ptr,
    w_ptr,
    part_ptr,
    M,
    N,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ITERS: tl.constexpr,
):
    """part[s] = x[:, ks] @ w[:, ks]^T over split s's share of K (fp8 in, fp32 partial sums out):
    more programs than output tiles, for the few rows of a decode step."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    per_split = ITERS * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(ITERS):
        offs_k = split * per_split + i * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :])
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(part_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=m_mask[:, None])


def fp8_splitk(xq: torch.Tensor, wq: torch.Tensor, part: torch.Tensor, cfg: dict) -> torch.Tensor:
    m, k = xq.shape
    n = wq.shape[0]
    _fp8_splitk_kernel[(n // cfg["block_n"], cfg["split_k"])](
        xq,
        wq,
        part,
        m,
        n,
        k,
        BLOCK_M=max(64, triton.next_power_of_2(m)),  # wgmma's 64 rows (fewer would fall back to mma.sync)
        BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"],
        SPLIT_K=cfg["split_k"],
        ITERS=k // cfg["split_k"] // cfg["block_k"],
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )
    return part


def _cycling(op, weights):
    """A no-argument call that runs op(next weight copy): one copy per captured call."""
    layer = itertools.cycle(weights)
    return lambda: op(next(layer))


def splitk_sweep(xq, wqs, prod_ref) -> dict:
    """The split-K candidate over a few launch configurations: µs of the GEMM alone (its fp32
    partial sums would be summed by the consuming kernel) and of GEMM + sum to bf16, and its
    largest difference from cuBLAS's product."""
    (m, k), n = xq.shape, wqs[0].shape[0]
    rows = []
    for block_n, block_k, split_k, warps, stages in itertools.product([64, 128], [128, 256], [1, 2, 4, 8], [4], [3, 4]):
        if n % block_n or k % (block_k * split_k):
            continue
        part = torch.empty(split_k, m, n, device=xq.device, dtype=torch.float32)
        cfg = {"block_n": block_n, "block_k": block_k, "split_k": split_k, "warps": warps, "stages": stages}

        def gemm(wq, part=part, cfg=cfg):
            return fp8_splitk(xq, wq, part, cfg)

        try:
            got = gemm(wqs[0]).sum(0).to(torch.bfloat16)
            us = graph_us(_cycling(gemm, wqs))
            us_sum = graph_us(_cycling(lambda wq, gemm=gemm: gemm(wq).sum(0).to(torch.bfloat16), wqs))
        except Exception as e:  # out of shared memory and the like: a result, not a stop
            rows.append({**cfg, "error": str(e)[:120]})
            continue
        err = (got.float() - prod_ref.float()).abs().max().item()
        rel = err / prod_ref.float().abs().max().item()
        rows.append({**cfg, "us": us, "us_with_sum": us_sum, "max_abs_diff_vs_cublas": err, "max_diff_over_max_value": rel})
    timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    errors = [r for r in rows if "error" in r][:2]
    return {"splitk_best": timed[0] if timed else None, "splitk_sweep": timed[:6], "splitk_errors": errors}


def measure(name: str, ws: list, wqs: list, wss: list, m: int, sweep: bool) -> dict:
    n, k = ws[0].shape
    dev = ws[0].device
    one = torch.ones((), device=dev)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xq, xs = quantize_rows(x)
    xs_t = xs.amax().reshape(())
    prod = torch._scaled_mm(xq, wqs[0].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    def per_layer(op, weights):
        return graph_us(_cycling(op, weights))

    r = {"proj": name, "n": n, "k": k, "m": m, "weight_MB_bf16": n * k * 2 / 1e6, "weight_copies": len(ws)}
    r["bf16_linear"] = per_layer(lambda w: F.linear(x, w), ws)
    r["quantize_rows"] = graph_us(lambda: quantize_rows(x))
    scales = itertools.cycle(wss)
    r["scaled_mm_rowwise"] = per_layer(
        lambda wq: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=next(scales), out_dtype=torch.bfloat16), wqs
    )
    r["scaled_mm_tensorwise"] = per_layer(
        lambda wq: torch._scaled_mm(xq, wq.t(), scale_a=xs_t, scale_b=one, out_dtype=torch.bfloat16), wqs
    )
    # The same product with the operands swapped, (Wq Xq^T)^T: cuBLAS picks its kernel for a
    # problem whose small side is N rather than M.
    r["scaled_mm_swapped"] = per_layer(
        lambda wq: torch._scaled_mm(wq, xq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), wqs
    )
    r["scale_product"] = graph_us(lambda: scale_product(prod, xs, wss[0], None))
    # GB/s of weight bytes streamed by each GEMM
    r["bf16_GB_s"] = n * k * 2 / r["bf16_linear"] / 1e3
    r["rowwise_GB_s"] = n * k / r["scaled_mm_rowwise"] / 1e3
    r["tensorwise_GB_s"] = n * k / r["scaled_mm_tensorwise"] / 1e3
    r["swapped_GB_s"] = n * k / r["scaled_mm_swapped"] / 1e3
    r["rowwise_TFLOP_s"] = 2 * m * n * k / r["scaled_mm_rowwise"] / 1e6
    if sweep:
        r.update(splitk_sweep(xq, wqs, prod))
        if r["splitk_best"]:
            r["splitk_GB_s"] = n * k / r["splitk_best"]["us"] / 1e3
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 8192])
    ap.add_argument("--layers", type=int, default=32, help="weight copies cycled through, one per captured call")
    ap.add_argument("--splitk-max-rows", type=int, default=64, help="sweep the split-K candidate up to this many rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "rows": [],
    }
    for name, (n, k) in SHAPES.items():
        ws, wqs, wss = [], [], []
        for _ in range(args.layers):
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / 64
            wq, scale = quantize_weight(w)
            ws.append(w)
            wqs.append(wq)
            wss.append(scale)
        for m in args.rows:
            r = measure(name, ws, wqs, wss, m, sweep=m <= args.splitk_max_rows)
            print(json.dumps({k: v for k, v in r.items() if k != "splitk_sweep"}), flush=True)
            results["rows"].append(r)
        del ws, wqs, wss
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
