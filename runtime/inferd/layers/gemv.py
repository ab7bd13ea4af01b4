"""One-row linear layers (a decode step at batch 1) as Triton GEMV kernels that also do the work
around them, so a decoder layer's step is a few kernels instead of a dozen (CUDA only).

At batch 1 a decode step streams every weight once and is bound by memory, but the 1.5B shape
ran at 44 % of that bound on the H200: its layers are small (a 4.7 MB o_proj), and each of the
step's ~12 kernels per layer pays a launch, a first memory round trip and a tail that stream
nothing (bench/bench_decode_step.py, BENCHMARKS.md). Here one kernel is

    out = W @ prologue(x)  (+ bias)  (-> epilogue)

- prologue `norm`: RMSNorm of x, or of x + residual (the pre-norm block's add), in the same pass
  over the row as the product (every program reads the whole row, a few KB, from L2; the row's
  1/rms scales the finished sums), program 0 writing x + residual for the next block, so the
  norm kernel disappears;
- epilogue `silu`: for the merged gate/up projection, each program computes its gate rows and the
  matching up rows and writes silu(gate) * up, so the SiLU-and-multiply kernel disappears and the
  product is half as wide;
- programmatic dependent launch (Hopper): each program loads its first weight tile, then waits
  for the kernel before it (`gdc_wait`), and lets the next kernel start as early as it can
  (`gdc_launch_dependents`): the next layer's first weight bytes are on their way while this one
  finishes, where a plain launch leaves the memory idle between kernels.

The same kernel takes several rows computed as one (AttentionContext.rows_as_one: a speculative
verify pass of one sequence): each program reads its weight tile once for up to ROWS_TOGETHER
rows and keeps one accumulator per row, each row summed exactly as a 1-row call sums it (the sum
order depends on the launch configuration and the tile layout, never on the other rows), so those
rows' logits are bit for bit what batch-1 decoding computes. What makes this cheap is the order
of sums both share: a thread first sums its G consecutive products (one 16-byte load of weights
where a weight row's bytes are a multiple of 16, as in every model here) and adds that to a
per-row accumulator a G-th of the tile's size, so several rows' accumulators fit in registers.

The arithmetic is the references' (fused.add_rms_norm, F.linear, fused.silu_and_mul) in float32,
rounded to bf16/fp16 where values are stored (x + residual, the output, SiLU's product); the
normalised row itself is not rounded before the product (it never exists) and the sums run in
another order than cuBLAS's, so results agree with the plain path to bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferd.layers.context import get_context


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (compute capability 9.0) and newer."""
    return torch.cuda.get_device_capability(device)[0] >= 9


# Whether the batch-1 decode kernels (these, and the rotary, KV store and attention kernels at one
# row) launch with programmatic dependent launch: set by the model runner (EngineConfig.fused_gemv
# on a Hopper). Only at one row: the chain of GEMVs is what it pays for, and with it on for the
# attention kernels of larger batches the 1.5B shape's step at 64 rows took 2.62 against 2.03 ms
# (H200, 2026-11-30, cause not yet measured).
# "ahead": the kernels that let the next one launch before they wait (`launch_ahead`): the small
# ones between the q/k/v and o projections (1.5B batch-1 step replay 1.231 -> 1.198 ms on the
# H200; the GEMVs as well measured slower, 1.208: bench_decode_step.py ablate, BENCHMARKS.md).
_PDL = {"on": False, "early": True, "ahead": ("rotary", "store", "attention", "merge")}


def set_pdl(on: bool) -> None:
    _PDL["on"] = bool(on)


def early_loads(on: bool) -> bool:
    """Whether a kernel launched with programmatic dependent launch (`on`) reads what no earlier
    kernel of the step writes (positions, slots, context lengths, block tables, cached K/V) before
    it waits."""
    return on and _PDL["early"]


def launch_ahead(on: bool, kernel: str) -> bool:
    """Whether `kernel` (rotary, store, attention, merge, gemv) launched with programmatic dependent
    launch (`on`) lets the next kernel launch at its start, before it waits for the one before
    it, so that the next kernel's programs are resident and load what they can early."""
    return on and kernel in _PDL["ahead"]


def pdl(rows: int = 1) -> bool:
    """Whether a kernel over `rows` rows launches with programmatic dependent launch: one row, or
    rows computed as one (a verify pass: AttentionContext.rows_as_one)."""
    return _PDL["on"] and (rows == 1 or get_context().rows_as_one)


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr, AHEAD: tl.constexpr = False):
    """At a kernel's start under programmatic dependent launch: wait for the kernel before it
    (and so for every earlier one: each of them waited too), then let the next one start (unless
    it was let start already: AHEAD, `pdl_ahead`)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if not AHEAD:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_ahead(USE_PDL: tl.constexpr, AHEAD: tl.constexpr):
    """At a kernel's very start (AHEAD): let the next kernel launch now. It still waits for this
    one to finish before it reads anything this one writes (its own gdc_wait)."""
    if USE_PDL and AHEAD:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _input_tile(x_ptr, res_ptr, res_out_ptr, kk, mask, write, HAS_RES: tl.constexpr):
    """Columns kk of one input row in float32: x as stored, or x + residual rounded to x's type as
    the eager add is (written to res_out by program 0, `write`)."""
    x = tl.load(x_ptr + kk, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + kk, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        if write:
            tl.store(res_out_ptr + kk, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _zeros_per_row(shape: tl.constexpr, ROWS: tl.constexpr):
    """One float32 accumulator of `shape` for each of ROWS rows (a tuple)."""
    return (tl.zeros(shape, dtype=tl.float32),) * ROWS


@triton.jit  # rows == 1 specialised (the group loop of one iteration compiles away: the batch-1 step)
def _gemv_kernel(
    x_ptr,
    res_ptr,
    res_out_ptr,
    nw_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    rows,
    N,
    K,
    stride_x,
    stride_w,
    up_offset,
    eps,
    NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    AHEAD: tl.constexpr,
    ROWS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program p: output columns [p * BLOCK_N, (p + 1) * BLOCK_N) of every row; with SILU, weight
    rows n (gate) and up_offset + n (up). The rows go in groups of ROWS, each group in one pass over
    the program's weight slice (the first from HBM, later groups' from cache).

    A weight tile is [BLOCK_N, BLOCK_K // G, G]: G consecutive columns a thread (one 16-byte load
    where a weight row's bytes are a multiple of 16; otherwise the compiler may spread them over
    threads, the same way at every row count). Each row's products over those G columns are summed
    and added to the row's own [BLOCK_N, BLOCK_K // G] accumulator, which is summed across the
    threads once at the end. A row's order of sums is the same whatever the other rows are, and the
    same as at one row: rows computed together are each bit for bit a 1-row call."""
    pdl_ahead(USE_PDL, AHEAD)
    pid = tl.program_id(0)
    KG: tl.constexpr = BLOCK_K // G
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_w
    u_rows = w_ptr + (rn + up_offset).to(tl.int64)[:, None] * stride_w
    # The first weight tiles depend on no earlier kernel: on their way before the wait.
    w0 = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk[None, :] < K), other=0.0)
    u0 = w0
    if SILU:
        u0 = tl.load(u_rows + rk[None, :], mask=n_mask[:, None] & (rk[None, :] < K), other=0.0)
    pdl_enter(USE_PDL, AHEAD)
    dtype = out_ptr.dtype.element_ty
    for first in range(0, rows, ROWS):
        w, u = w0, u0
        # The norm: each row's squares summed alongside its products and reduced once at the end;
        # the norm weight multiplies the row, the row's 1/rms the finished sums (a scalar per row:
        # W (gamma * s / rms) = (W (gamma * s)) / rms), so it costs no pass of its own.
        sq = _zeros_per_row([KG], ROWS)
        acc = _zeros_per_row([BLOCK_N, KG], ROWS)
        acc_u = _zeros_per_row([BLOCK_N, KG], ROWS)
        for k0 in range(0, K, BLOCK_K):
            # The next tiles are requested before this one is used: two tiles in flight per program.
            nk = k0 + BLOCK_K + rk
            w_next = tl.load(w_rows + nk[None, :], mask=n_mask[:, None] & (nk[None, :] < K), other=0.0)
            if SILU:
                u_next = tl.load(u_rows + nk[None, :], mask=n_mask[:, None] & (nk[None, :] < K), other=0.0)
            kk = k0 + rk
            if NORM:
                gamma = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            # [BLOCK_N, KG, G]: a thread's G consecutive columns (as loaded) on the last axis.
            wf = tl.reshape(w.to(tl.float32), [BLOCK_N, KG, G])
            uf = tl.reshape(u.to(tl.float32), [BLOCK_N, KG, G])
            sq_next = ()
            acc_next = ()
            acc_u_next = ()
            for r in tl.static_range(ROWS):
                row = first + r
                x_row, res_row, res_out_row = x_ptr + row * stride_x, res_ptr + row * K, res_out_ptr + row * K
                x = _input_tile(x_row, res_row, res_out_row, kk, (kk < K) & (row < rows), pid == 0, HAS_RES)
                if NORM:
                    sq_next = sq_next + (sq[r] + tl.sum(tl.reshape(x * x, [KG, G]), 1),)
                    x = x * gamma
                x = tl.reshape(x, [KG, G])[None, :, :]
                acc_next = acc_next + (acc[r] + tl.sum(wf * x, 2),)
                if SILU:
                    acc_u_next = acc_u_next + (acc_u[r] + tl.sum(uf * x, 2),)
            if NORM:
                sq = sq_next
            acc = acc_next
            w = w_next
            if SILU:
                acc_u = acc_u_next
                u = u_next
        for r in tl.static_range(ROWS):
            row = first + r
            rstd = 1.0
            if NORM:
                rstd = tl.rsqrt(tl.sum(sq[r], 0) / K + eps)
            out = tl.sum(acc[r], 1) * rstd
            if HAS_BIAS:
                out += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            out = out.to(dtype)
            if SILU:
                up = tl.sum(acc_u[r], 1) * rstd
                if HAS_BIAS:
                    up += tl.load(bias_ptr + up_offset + rn, mask=n_mask, other=0.0).to(tl.float32)
                g = out.to(tl.float32)
                act = (g / (1.0 + tl.exp(-g))).to(dtype)  # F.silu, rounded as the eager op rounds
                out = (act.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
            tl.store(out_ptr + row * N + rn, out, mask=n_mask & (row < rows))
        # The next group's first tiles (from cache), loaded only now so that the first ones are not
        # held in registers through this group's loop (at one row the loop runs once: no load).
        w0 = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk[None, :] < K), other=0.0)
        if SILU:
            u0 = tl.load(u_rows + rk[None, :], mask=n_mask[:, None] & (rk[None, :] < K), other=0.0)


# Rows computed together in one pass over a program's weight slice (more go in further passes,
# the weights then from cache): 8 takes a verify pass of up to 7 drafted tokens in one.
ROWS_TOGETHER = 8


def gemv_config(n: int, k: int, norm: bool, silu: bool) -> dict:
    """Launch configuration by the projection: the fastest at one row of runtime/bench/bench_gemv.py's
    sweep on the H200 for the 1.5B and 8B shapes (BENCHMARKS.md, fifth pass); the batch-1 step
    comes first, so a few choices are slower over the 5 rows of a verify pass (the 8B qkv). A
    verify pass's rows and the batch-1 step use the same configuration: that is part of what keeps
    them bit for bit equal."""
    if silu:  # gate and up rows: two tiles in flight per step
        return dict(BLOCK_N=4, BLOCK_K=256, num_warps=4) if k < 2048 else dict(BLOCK_N=8, BLOCK_K=512, num_warps=4)
    if norm:
        return dict(BLOCK_N=8, BLOCK_K=512 if k >= 4096 else 1024, num_warps=4)
    if n >= 4096:
        return dict(BLOCK_N=8, BLOCK_K=2048, num_warps=8)
    return dict(BLOCK_N=4, BLOCK_K=2048, num_warps=8) if k >= 4096 else dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple | None = None,
    silu: bool = False,
    use_pdl: bool | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x (R, K) @ weight (N, K)^T (+ bias) -> (R, N) in x's dtype, each row computed as a 1-row
    call would compute it (R is 1 at a batch-1 step; more for rows computed as one).

    `norm` (residual or None, norm_weight, eps, residual_out or None): the input is RMSNorm(x +
    residual) (RMSNorm(x) without a residual), x + residual written to residual_out. `silu`:
    weight stacks gate and up (2I rows): returns silu(gate) * up, (R, I). `config` overrides the
    launch (benchmarks sweep it; its `rows_together` the rows a program takes in one pass)."""
    if x.dim() != 2 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"gemv takes rows of contiguous elements and a row-major weight, got x {tuple(x.shape)}")
    residual, norm_weight, eps, residual_out = norm if norm is not None else (None, None, 0.0, None)
    if residual is not None and not (residual_out is not None and residual.is_contiguous() and residual_out.is_contiguous()):
        raise ValueError("gemv's norm with a residual needs a contiguous residual and a contiguous residual_out for x + residual")
    rows, k = x.shape
    n = weight.shape[0] // 2 if silu else weight.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    cfg = dict(config or gemv_config(n, k, norm is not None, silu))
    use_pdl = pdl(rows) if use_pdl is None else use_pdl
    together = cfg.pop("rows_together", ROWS_TOGETHER)
    if together < 1:
        raise ValueError(f"gemv's rows_together must be at least 1, got {together}")
    group = triton.cdiv(rows, triton.cdiv(rows, together))  # groups as even as they go: 9 rows as 5 + 4
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x,
        residual if residual is not None else x,
        residual_out if residual_out is not None else x,
        norm_weight if norm_weight is not None else x,
        weight,
        bias if bias is not None else x,
        out,
        rows,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        n,
        eps,
        NORM=norm is not None,
        HAS_RES=residual is not None,
        SILU=silu,
        HAS_BIAS=bias is not None,
        USE_PDL=use_pdl,
        AHEAD=launch_ahead(use_pdl, "gemv"),
        ROWS=group,
        G=16 // x.element_size(),
        launch_pdl=use_pdl,
        **cfg,
    )
    return out
