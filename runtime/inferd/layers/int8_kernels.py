"""Triton GEMMs with int8 weights (N, K) and one scale per output channel, the scales (and the
bias) applied in the epilogue, so no widened copy of the weight ever exists in memory:
- `w8a16_matmul`: bfloat16/float16 activations, the int8 weight tile widened in registers
  (int8 -> float is exact), a float32 accumulator; the `int8_weight_only` path on CUDA;
- `w8a8_matmul`: int8 activations with their per-token scales, an int8 x int8 -> int32 tensor-core
  dot (exact), the two scales applied to the int32 sum; the alternative to `torch._int_mm` plus a
  scaling pass that runtime/bench/bench_int8.py measures.
Both run under the Triton interpreter on the CPU (TRITON_INTERPRET=1) for the tests.

Decode reads each weight once per token: with 1-16 rows the kernel is a GEMV whose speed is the
weight bandwidth, so the small-M configurations use narrow N tiles (enough programs to fill the
GPU's SMs) and long K tiles (few loop iterations): `tile_config`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def tile_config(m: int, n: int) -> dict:
    """Tiles and warps by the number of rows, chosen in Python rather than by autotuning: an
    autotuner would time candidates at the first call of each new shape, which may fall inside a
    CUDA graph capture (one per decode batch bucket) where timing cannot run."""
    if m <= 16:
        # A GEMV: narrow N tiles make N / BLOCK_N programs (128 for N = 4096) to fill the SMs.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


@triton.jit
def _int8_weight_gemm(
    x_ptr,
    w_ptr,
    out_ptr,
    x_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    X_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if X_INT8 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        if X_INT8:
            acc += tl.dot(x, w, out_dtype=tl.int32)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out = acc.to(tl.float32) * tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if X_INT8:
        out = out * tl.load(x_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, wq, w_scale, bias, x_scale, out_dtype):
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise ValueError(f"x has {k} columns but the weight has {wq.shape[1]}")
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out

    cfg = tile_config(m, n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _int8_weight_gemm[grid](
        x,
        wq,
        out,
        x_scale if x_scale is not None else w_scale,
        w_scale,
        bias if bias is not None else w_scale,
        m,
        n,
        k,
        x.stride(0),
        wq.stride(0),
        out.stride(0),
        X_INT8=x_scale is not None,
        HAS_BIAS=bias is not None,
        **cfg,
    )
    return out


def w8a16_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) bf16/fp16 @ (wq (N, K) int8 * w_scale (1, N))^T + bias -> (M, N) in x's dtype."""
    return _launch(x, wq, w_scale.view(-1), bias, None, x.dtype)


def w8a8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq (M, K) int8 with x_scale (M, 1), wq (N, K) int8 with w_scale (1, N) -> (M, N) out_dtype."""
    return _launch(xq, wq, w_scale.view(-1), bias, x_scale.view(-1), out_dtype)
