"""Decoder-layer elementwise kernels written in Triton (CUDA only), where torch.compile's own
kernels were slow at decode sizes (per-kernel times from bench/bench_decode_step.py on an H200):

- the q/k/v split and rotary embedding: torch.compile made three to five kernels of
  `fused.qkv_rotary` (q, k, v, the cos/sin gather), 10-12 us per layer at 64 rows; one kernel
  that reads the projection's row once takes about 3;
- SiLU-and-multiply with its fp8 output: a 14,336-wide row's amax is a reduction that torch.compile
  walks in chunks, twice (12.3 us at 64 rows); here one program holds a whole row in registers
  and reads it once (6.1 us at 64 rows, 258 us = 2.3 TB/s at 8,192).

The arithmetic is that of the references in fused.py, which the tests hold them to: fp8 scales
and bias applied in float32 and rounded to the output type, as `finish` does; bf16 results
rounded where the eager reference rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferd.layers.fused import ROW_FORMATS
from inferd.layers.gemv import early_loads, launch_ahead, pdl, pdl_ahead, pdl_enter


@triton.jit
def _load_finished(x_ptr, ws_ptr, bias_ptr, xs, cols, mask, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Columns `cols` of a projection row in float32: as stored, or an fp8 product finished as
    `fused.finish` does it (x * x_scale * weight_scale + bias in float32, rounded to x's type)."""
    x = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if SCALED:
        f = x.to(tl.float32) * xs * tl.load(ws_ptr + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            f += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = f.to(x.dtype)
    return x.to(tl.float32)


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
    x1 = _load_finished(x_ptr, ws_ptr, bias_ptr, xs, cols, mask, SCALED, HAS_BIAS)
    x2 = _load_finished(x_ptr, ws_ptr, bias_ptr, xs, cols + HALF, mask, SCALED, HAS_BIAS)
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
    USE_PDL: tl.constexpr,
    EARLY: tl.constexpr,
    AHEAD: tl.constexpr,
):
    pdl_ahead(USE_PDL, AHEAD)
    if not EARLY:
        pdl_enter(USE_PDL, AHEAD)
    t = tl.program_id(0).to(tl.int64)  # row offsets in 64 bits, as in the SiLU kernel
    HALF: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_j = tl.arange(0, HALF)
    # cos_sin is [2, max_pos, HEAD_DIM] with both halves of a row equal; rounded as `.to(q.dtype)`.
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + offs_j).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(cos_sin_ptr + (max_pos + pos) * HEAD_DIM + offs_j).to(q_ptr.dtype.element_ty).to(tl.float32)
    if EARLY:  # positions and the table: no kernel of the step writes them
        pdl_enter(USE_PDL, AHEAD)
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


def _scale_args(x, x_scale, weight_scale, bias):
    """The kernels' (x_scale, weight_scale, bias) pointers and SCALED / HAS_BIAS flags: x stands
    in for a pointer that a configuration does not read."""
    scaled = x_scale is not None
    has_bias = scaled and bias is not None
    return (x_scale if scaled else x, weight_scale if scaled else x, bias if has_bias else x), scaled, has_bias


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
    scale_ptrs, scaled, has_bias = _scale_args(x, x_scale, weight_scale, bias)
    on = pdl(tokens)
    _qkv_rotary_kernel[(tokens,)](
        x,
        *scale_ptrs,
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
        HAS_BIAS=has_bias,
        USE_PDL=on,
        EARLY=early_loads(on),
        AHEAD=launch_ahead(on, "rotary"),
        launch_pdl=on,
        num_warps=4,
    )
    return q, k, v


@triton.jit
def _round_half_even(x):
    """torch.round's rounding (ties to even) from floor alone, exact in float32 for the int8 range
    (libdevice's rint has no Triton-interpreter twin for the CPU tests)."""
    r = tl.floor(x)
    d = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    out_scale_ptr,
    stride_x,
    stride_out,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr,
    INT8: tl.constexpr,
    QMAX: tl.constexpr,
):
    """One row: silu(gate) * up from the fused gate/up product ([gate | up], 2N wide); with QUANT
    the row quantized (fp8, or int8 with INT8) with its scale (largest magnitude / QMAX)."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    row = x_ptr + t.to(tl.int64) * stride_x
    dtype = x_ptr.dtype.element_ty
    if SCALED:
        xs = tl.load(xs_ptr + t)
    else:
        xs = 1.0
    g = _load_finished(row, ws_ptr, bias_ptr, xs, offs, mask, SCALED, HAS_BIAS)
    u = _load_finished(row, ws_ptr, bias_ptr, xs, N + offs, mask, SCALED, HAS_BIAS)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)  # F.silu, rounded as the eager op rounds
    h = (act.to(tl.float32) * u).to(dtype).to(tl.float32)
    out = out_ptr + t.to(tl.int64) * stride_out + offs
    if QUANT:
        scale = tl.maximum(tl.max(tl.where(mask, tl.abs(h), 0.0), 0), 1e-12) / QMAX
        # Triton's "/" (div.full.f32, within 2 ulp) as in torch.compile's quantize kernels, not
        # an IEEE div_rn.
        q = h / scale
        if INT8:
            q = _round_half_even(q)
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        tl.store(out, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_scale_ptr + t, scale)
    else:
        tl.store(out, h.to(out_ptr.dtype.element_ty), mask=mask)


def _silu_warps(rows: int, block: int) -> int:
    """From a sweep on the H200 (docs/bench/2026-11-28-h200-silu-warps*.json): at decode sizes
    few programs run, and a whole row spread over up to 32 warps (16 elements a thread) is
    fastest (6.1 against 7.8 us at 64 rows of 14,336 with 4 warps); once the rows fill the GPU,
    4 warps are (258 against 295 us at 8,192 rows)."""
    return 4 if rows >= 512 else max(1, min(32, block // 512))


def silu_and_mul_triton(x, x_scale=None, weight_scale=None, bias=None, quant: str | None = None, num_warps: int | None = None):
    """Same contract as `fused.silu_and_mul`: (M, 2N) -> (M, N), or with `quant` ("fp8", "int8")
    the quantized rows and their float32 scales (M, 1). `num_warps` overrides the launch
    (benchmarks sweep it)."""
    rows, n = x.shape[0], x.shape[1] // 2
    qdtype, qmax = ROW_FORMATS[quant] if quant else (x.dtype, 1.0)
    out = torch.empty(rows, n, device=x.device, dtype=qdtype)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32) if quant else out
    if rows:
        assert x.stride(1) == 1
        scale_ptrs, scaled, has_bias = _scale_args(x, x_scale, weight_scale, bias)
        block = triton.next_power_of_2(n)
        _silu_and_mul_kernel[(rows,)](
            x,
            *scale_ptrs,
            out,
            scale,
            x.stride(0),
            out.stride(0),
            N=n,
            BLOCK=block,
            SCALED=scaled,
            HAS_BIAS=has_bias,
            QUANT=bool(quant),
            INT8=quant == "int8",
            QMAX=qmax,
            num_warps=num_warps or _silu_warps(rows, block),
        )
    return (out, scale) if quant else out


# The greedy token of a few rows (a batch-1 step's sampling): torch took five kernels and ~23 us
# of the 1.5B step on the H200 (a chunked max, the chunks' argmax, a gather, an add, a cast;
# bench_decode_step.py timeline); here each program takes one chunk of a row, and a second kernel
# the chunks' winners.
ARGMAX_CHUNK = 2048


@triton.jit
def _first_max(vals, cols, vocab):
    """Of `vals` (at columns `cols`; `vocab` where none): the largest and the first column holding
    it, a NaN counting larger than anything (torch.argmax's order): (NaN, its first column) then."""
    nan = vals != vals
    first_nan = tl.min(tl.where(nan, cols, vocab), 0)
    top = tl.max(tl.where(nan, float("-inf"), vals), 0)
    first_top = tl.min(tl.where(vals == top, cols, vocab), 0)
    has_nan = first_nan < vocab
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, first_nan, first_top)


@triton.jit
def _chunk_argmax_kernel(x_ptr, val_ptr, idx_ptr, stride_x, vocab, CHUNKS, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (row, c): the largest value of the row's chunk c and the first column holding it."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    top, col = _first_max(x, cols, vocab)
    tl.store(val_ptr + row * CHUNKS + c, top)
    tl.store(idx_ptr + row * CHUNKS + c, col)


@triton.jit
def _rows_argmax_kernel(val_ptr, idx_ptr, out_ptr, CHUNKS, vocab, CHUNKS_POW2: tl.constexpr, USE_PDL: tl.constexpr):
    """Program row: the first column of the row's largest value, from its chunks' winners (the
    chunks are in column order, so the first of the chunks holding it has it)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS_POW2)
    vals = tl.load(val_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
    cols = tl.load(idx_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=vocab)
    _, col = _first_max(vals, cols, vocab)
    tl.store(out_ptr + row, col.to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (rows of contiguous columns) -> [R] int64: each row's first maximum, as
    logits.argmax(-1) (the first NaN where there is one; a row of -inf gives column 0)."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("argmax_rows takes rows of contiguous columns")
    chunks = triton.cdiv(vocab, ARGMAX_CHUNK)
    vals = torch.empty(rows, chunks, device=logits.device, dtype=torch.float32)
    idx = torch.empty(rows, chunks, device=logits.device, dtype=torch.int32)
    out = torch.empty(rows, device=logits.device, dtype=torch.int64)
    on = pdl()  # the engine's setting (set where the device has it)
    _chunk_argmax_kernel[(rows, chunks)](
        logits, vals, idx, logits.stride(0), vocab, chunks, BLOCK=ARGMAX_CHUNK, USE_PDL=on, launch_pdl=on, num_warps=8
    )
    _rows_argmax_kernel[(rows,)](
        vals, idx, out, chunks, vocab, CHUNKS_POW2=triton.next_power_of_2(chunks), USE_PDL=on, launch_pdl=on, num_warps=4
    )
    return out
