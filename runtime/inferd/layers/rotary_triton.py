"""The q/k/v split and rotary embedding as one Triton kernel (CUDA only).

torch.compile turns `fused.qkv_rotary` into four or five kernels (q, k, v and the cos/sin gather
each get their own), 10-12 us per layer at decode sizes on an H200, where one kernel that reads
the projection's row once takes about 3 (bench/bench_decode_step.py). The arithmetic is that of
`fused.qkv_rotary`, the reference it is tested against: the fp8 scales and bias applied in float32
and rounded to the output type, cos and sin rounded to it, the rotation computed in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(
    x_ptr,
    out_ptr,
    ws_ptr,
    bias_ptr,
    xs,
    col0,
    cos,
    sin,
    out_stride_t,
    t,
    HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """HEADS heads starting at column col0 of the projection row: finish, rotate, store."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, HEADS_PAD)
    offs_j = tl.arange(0, HALF)
    mask = (offs_h < HEADS)[:, None]
    cols = col0 + offs_h[:, None] * HEAD_DIM + offs_j[None, :]  # first halves; second at + HALF
    x1 = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + cols + HALF, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        x1 = x1 * xs * tl.load(ws_ptr + cols, mask=mask, other=0.0)
        x2 = x2 * xs * tl.load(ws_ptr + cols + HALF, mask=mask, other=0.0)
        if HAS_BIAS:
            x1 += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            x2 += tl.load(bias_ptr + cols + HALF, mask=mask, other=0.0).to(tl.float32)
        x1 = x1.to(out_ptr.dtype.element_ty).to(tl.float32)  # the finished product, as `finish` rounds it
        x2 = x2.to(out_ptr.dtype.element_ty).to(tl.float32)
    if ROTATE:
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
    else:
        o1, o2 = x1, x2
    out = out_ptr + t * out_stride_t + offs_h[:, None] * HEAD_DIM + offs_j[None, :]
    tl.store(out, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rotary_kernel(
    x_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    pos_ptr,
    cos_sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    stride_x,
    max_pos,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    KV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    t = tl.program_id(0)
    HALF: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_j = tl.arange(0, HALF)
    # cos_sin is [2, max_pos, HEAD_DIM] with both halves of a row equal; rounded as `.to(q.dtype)`.
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + offs_j).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(cos_sin_ptr + (max_pos + pos) * HEAD_DIM + offs_j).to(q_ptr.dtype.element_ty).to(tl.float32)
    if SCALED:
        xs = tl.load(xs_ptr + t)
    else:
        xs = 1.0
    row = x_ptr + t * stride_x
    q_size: tl.constexpr = NUM_HEADS * HEAD_DIM
    kv_size: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    _rotate(row, q_ptr, ws_ptr, bias_ptr, xs, 0, cos, sin, q_size, t, NUM_HEADS, HEADS_PAD, HEAD_DIM, SCALED, HAS_BIAS, True)
    _rotate(
        row, k_ptr, ws_ptr, bias_ptr, xs, q_size, cos, sin, kv_size, t, NUM_KV_HEADS, KV_PAD, HEAD_DIM, SCALED, HAS_BIAS, True
    )
    _rotate(
        row,
        v_ptr,
        ws_ptr,
        bias_ptr,
        xs,
        q_size + kv_size,
        cos,
        sin,
        kv_size,
        t,
        NUM_KV_HEADS,
        KV_PAD,
        HEAD_DIM,
        SCALED,
        HAS_BIAS,
        False,
    )


def qkv_rotary_triton(positions, x, x_scale, weight_scale, bias, cos_sin, head_dim: int, q_size: int, kv_size: int):
    """Same contract as `fused.qkv_rotary`: (q [T, q_size], k [T, kv_size], v [T, kv_size])."""
    tokens = x.shape[0]
    q = torch.empty(tokens, q_size, device=x.device, dtype=x.dtype)
    k = torch.empty(tokens, kv_size, device=x.device, dtype=x.dtype)
    v = torch.empty(tokens, kv_size, device=x.device, dtype=x.dtype)
    if tokens == 0:
        return q, k, v
    assert x.stride(1) == 1 and cos_sin.is_contiguous() and head_dim % 2 == 0
    heads, kv_heads = q_size // head_dim, kv_size // head_dim
    scaled = x_scale is not None
    dummy = x  # pointer arguments a configuration does not read
    _qkv_rotary_kernel[(tokens,)](
        x,
        x_scale if scaled else dummy,
        weight_scale if scaled else dummy,
        bias if scaled and bias is not None else dummy,
        positions,
        cos_sin,
        q,
        k,
        v,
        x.stride(0),
        cos_sin.shape[1],
        NUM_HEADS=heads,
        HEADS_PAD=triton.next_power_of_2(heads),
        NUM_KV_HEADS=kv_heads,
        KV_PAD=triton.next_power_of_2(kv_heads),
        HEAD_DIM=head_dim,
        SCALED=scaled,
        HAS_BIAS=scaled and bias is not None,
        num_warps=4,
    )
    return q, k, v
