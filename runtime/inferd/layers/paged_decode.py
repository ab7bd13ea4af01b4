"""Paged decode attention as Triton kernels (CUDA only).

One program per (sequence, KV head, split): it loads the query heads of that KV head's group,
walks its share of the sequence's block table TILE tokens at a time and keeps an online softmax,
so K/V are read once per group whatever the GQA ratio. With few sequences the context is split
across programs (flash-decoding) and a second kernel merges the partial softmaxes, so a batch of
one still fills the GPU. Shapes are static per batch, so CUDA graphs capture both kernels; how
many splits work (and whether one takes the whole context, with nothing to merge) follows the
context, read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferd.layers.fused import FP8, FP8_MAX
from inferd.layers.gemv import early_loads, launch_ahead, pdl, pdl_ahead, pdl_enter
from inferd.layers.mla_decode import sm_count


@triton.jit
def _widen_fp8_opaque(x):
    """e4m3 bytes (as uint8) -> fp16, exactly, in registers. For V an fp8 cache must be widened
    before it goes through shared memory: V's contiguous axis is not the reduction axis of p @ v,
    and Triton, left to its cast, stages the bytes and reads them back one at a time (128 byte
    loads per thread and tile) where 16-bit values take a transposing ldmatrix. The inline asm is
    marked impure so the compiler cannot move the layout conversion in front of it."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r",
        [x],
        dtype=tl.float16,
        is_pure=False,
        pack=4,
    )


@triton.jit
def _tile_offsets(
    block_tables_ptr,
    seq,
    kv_head,
    start,
    hi,
    stride_bt,
    offs_d,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
):
    """Where tokens [start, start + TILE) of the sequence (those below hi) keep one KV head's K
    (and V) in the cache, and the tokens' mask."""
    token_stride = NUM_KV_HEADS * HEAD_DIM
    offs_t = start + tl.arange(0, TILE)
    t_mask = offs_t < hi
    blocks = tl.load(block_tables_ptr + seq * stride_bt + offs_t // BLOCK_SIZE, mask=t_mask, other=0)
    base = blocks.to(tl.int64) * (BLOCK_SIZE * token_stride) + (offs_t % BLOCK_SIZE) * token_stride + kv_head * HEAD_DIM
    return base[:, None] + offs_d[None, :], t_mask


@triton.jit
def _load_k(k_cache_ptr, offs, t_mask, COMPUTE: tl.constexpr):
    return tl.load(k_cache_ptr + offs, mask=t_mask[:, None], other=0.0).to(COMPUTE)


@triton.jit
def _load_v(v_cache_ptr, offs, t_mask, COMPUTE: tl.constexpr, WIDEN_V_IN_REGISTERS: tl.constexpr):
    if WIDEN_V_IN_REGISTERS:
        v = _widen_fp8_opaque(tl.load(v_cache_ptr.to(tl.pointer_type(tl.uint8)) + offs, mask=t_mask[:, None], other=0))
    else:
        v = tl.load(v_cache_ptr + offs, mask=t_mask[:, None], other=0.0).to(COMPUTE)
    return v


@triton.jit
def _softmax_step(q, k, t_mask, m, denom, scale, PRECISION: tl.constexpr):
    """One tile of keys into the online softmax: its probabilities, the old state's rescale,
    and the new maximum and denominator (the values' product is the caller's, V read after)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
    s = tl.where(t_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    return p, alpha, m_new, denom * alpha + tl.sum(p, 1)


@triton.jit
def _split_share(ctx_len, TILE: tl.constexpr, SPLITS: tl.constexpr):
    """(tiles a split takes, splits that work) for a context of ctx_len tokens: its tiles shared
    out over up to SPLITS programs, a tile or more each, so a short context takes fewer splits
    (a one-tile context one: no merge). Read on the device, so one captured launch fits every
    context."""
    tiles = tl.cdiv(ctx_len, TILE)
    per_split = tl.cdiv(tiles, SPLITS)
    return per_split, tl.cdiv(tiles, tl.maximum(per_split, 1))


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    scale,
    stride_bt,
    new_tokens,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    COMPUTE: tl.constexpr,
    WIDEN_V_IN_REGISTERS: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY: tl.constexpr,
    AHEAD: tl.constexpr,
):
    pdl_ahead(USE_PDL, AHEAD)
    if not EARLY:
        pdl_enter(USE_PDL, AHEAD)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens_ptr + seq)
    # This split's token range, in whole tiles (the merge kernel works the same out).
    per_split, working = _split_share(ctx_len, TILE, SPLITS)
    if split >= tl.maximum(working, 1):  # past the context: nothing to read, nothing for the merge
        return
    lo = split * per_split * TILE
    hi = tl.minimum((split + 1) * per_split * TILE, ctx_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    first = lo  # the loop's first tile
    if EARLY:
        # The split's first tile before the wait: the cache holds it from earlier steps, except
        # this step's new tokens (the last `new_tokens` of the context, stored by the kernel
        # before): a tile that may hold one is read again after the wait.
        offs0, mask0 = _tile_offsets(
            block_tables_ptr, seq, kv_head, lo, hi, stride_bt, offs_d, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, TILE
        )
        k0 = _load_k(k_cache_ptr, offs0, mask0, COMPUTE)
        v0 = _load_v(v_cache_ptr, offs0, mask0, COMPUTE, WIDEN_V_IN_REGISTERS)
        pdl_enter(USE_PDL, AHEAD)
        if lo + TILE > ctx_len - new_tokens:
            k0 = _load_k(k_cache_ptr, offs0, mask0, COMPUTE)
            v0 = _load_v(v_cache_ptr, offs0, mask0, COMPUTE, WIDEN_V_IN_REGISTERS)
        first = lo + TILE
    head = kv_head * GROUP + offs_g
    q_mask = offs_g < GROUP
    q = tl.load(
        q_ptr + (seq * NUM_KV_HEADS * GROUP + head)[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask[:, None], other=0.0
    )
    if COMPUTE == tl.float16:  # an fp8 cache: q narrowed to fp16, saturating rather than overflowing
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0)
    q = q.to(COMPUTE)

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    if EARLY:
        if lo < hi:  # only a context of 0 tokens (a test's padded row) leaves its split empty
            p, alpha, m, denom = _softmax_step(q, k0, mask0, m, denom, scale, PRECISION)
            acc = acc * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PRECISION).to(tl.float32)
    for start in range(first, hi, TILE):
        offs, t_mask = _tile_offsets(
            block_tables_ptr, seq, kv_head, start, hi, stride_bt, offs_d, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, TILE
        )
        k = _load_k(k_cache_ptr, offs, t_mask, COMPUTE)
        p, alpha, m, denom = _softmax_step(q, k, t_mask, m, denom, scale, PRECISION)
        v = _load_v(v_cache_ptr, offs, t_mask, COMPUTE, WIDEN_V_IN_REGISTERS)  # after the scores, as before
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)

    if SPLITS == 1:  # resolved at compile time: no partial state in the one-split kernel
        _store_output(out_ptr, acc, denom, seq, head, q_mask, offs_d, NUM_KV_HEADS, GROUP, HEAD_DIM)
    elif working <= 1:  # one split took the whole context: nothing to merge
        _store_output(out_ptr, acc, denom, seq, head, q_mask, offs_d, NUM_KV_HEADS, GROUP, HEAD_DIM)
    else:  # the group's heads' partial state (not the padding rows)
        row = ((seq * NUM_KV_HEADS + kv_head) * SPLITS + split) * GROUP + offs_g
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=q_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m, mask=q_mask)
        tl.store(part_ml_ptr + row * 2 + 1, denom, mask=q_mask)


@triton.jit
def _store_output(
    out_ptr, acc, denom, seq, head, q_mask, offs_d, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """The group's heads' normalized output rows."""
    tl.store(
        out_ptr + (seq * NUM_KV_HEADS * GROUP + head)[:, None] * HEAD_DIM + offs_d[None, :],
        (acc / denom[:, None]).to(out_ptr.dtype.element_ty),
        mask=q_mask[:, None],
    )


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    stride_k,
    stride_v,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
    CLAMP: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """One program per new token: its K and V rows (all KV heads) into their cache slot, in the
    cache's element type (fp8 saturates at +-CLAMP)."""
    pdl_ahead(USE_PDL, AHEAD)
    if not EARLY:
        pdl_enter(USE_PDL, AHEAD)
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if EARLY:  # the slots: no kernel of the step writes them
        pdl_enter(USE_PDL, AHEAD)
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
    if CLAMP > 0:
        k = tl.minimum(tl.maximum(k.to(tl.float32), -CLAMP), CLAMP)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -CLAMP), CLAMP)
    tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, Hkv, D] (each row contiguous) -> caches [num_blocks, block_size, Hkv, D] at `slots`:
    one kernel for both, casting to the cache's type on the way."""
    tokens, num_kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    row = num_kv_heads * head_dim
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(2) == 1 and v.stride(1) == head_dim
    clamp = FP8_MAX if k_cache.dtype == FP8 else 0.0
    on = pdl(tokens)
    _store_kv_kernel[(tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        v.stride(0),
        ROW=row,
        ROW_PAD=triton.next_power_of_2(row),
        CLAMP=clamp,
        USE_PDL=on,
        EARLY=early_loads(on),
        AHEAD=launch_ahead(on, "store"),
        launch_pdl=on,
    )


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    context_lens_ptr,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """One program per (sequence, query head): the partial softmaxes of the splits that worked
    into the head's output (a program a head, so each reads a few KB rather than its group's)."""
    pdl_ahead(USE_PDL, AHEAD)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if not EARLY:
        pdl_enter(USE_PDL, AHEAD)
    ctx_len = tl.load(context_lens_ptr + seq)  # from the host, before the step (EARLY: before the wait)
    if EARLY:
        # The wait even when there is nothing to merge: the next kernel's wait covers this kernel
        # only, so this one must not end before the attention kernel has.
        pdl_enter(USE_PDL, AHEAD)
    _, working = _split_share(ctx_len, TILE, SPLITS)
    if working <= 1:  # the attention kernel wrote the output
        return
    # Every working split's partial state in one load (a loop over the splits would wait for each
    # in turn).
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < working
    kv_head = head // GROUP
    rows = ((seq * NUM_KV_HEADS + kv_head) * SPLITS + offs_s) * GROUP + head % GROUP  # [S]
    m_s = tl.load(part_ml_ptr + rows * 2, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + rows * 2 + 1, mask=s_mask, other=0.0)
    acc_s = tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    m = tl.max(m_s, 0)
    # A masked split has m_s = -inf and l_s = 0 (weight 0).
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m))
    denom = tl.sum(l_s * w, 0)
    out = tl.sum(acc_s * w[:, None], 0) / denom
    tl.store(out_ptr + (seq * NUM_KV_HEADS * GROUP + head) * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


# The most splits a sequence's context takes (a split takes at least one tile, so a short context
# fewer): 16 against 8 cut the kernel's time at 4,096 tokens by about a third on the H200 (BENCHMARKS.md,
# eighth pass) and cost nothing measurable in the batch-1 step up to 384 tokens.
MAX_SPLITS = 16


def num_splits(batch: int, num_kv_heads: int, sm_count: int = 132) -> int:
    """Enough programs to cover the GPU about four times, at most MAX_SPLITS a sequence; one
    split once the batch does that alone (the best split counts of the H200 sweeps in
    BENCHMARKS.md)."""
    programs = batch * num_kv_heads
    return max(1, min(MAX_SPLITS, (4 * sm_count) // max(1, programs)))


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    splits: int | None = None,
    tile: int | None = None,
    num_warps: int = 4,
    num_stages: int = 4,
    compute_dtype: torch.dtype | None = None,
    widen_v_in_registers: bool | None = None,
) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, W]; context_lens [B].
    The keyword arguments override the launch configuration (bench/bench_decode_step.py sweeps them).

    An fp8 cache is widened to fp16, not to q's bf16, for the products (exact for e4m3 values,
    and the conversion is cheaper: 41 against 62 us for 64 sequences of 640 tokens on the H200),
    V in registers (35 us), in 64-token tiles when the sequences fill the GPU alone and in
    128-token tiles when their contexts are split (the sweeps in BENCHMARKS.md)."""
    fp8_cache = k_cache.dtype == FP8
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    splits = splits or num_splits(batch, num_kv_heads, sm_count(q.device))
    tile = tile or (128 if fp8_cache and splits > 1 else 64)
    compute_dtype = compute_dtype or (torch.float16 if fp8_cache and q.dtype != torch.float32 else q.dtype)
    if widen_v_in_registers is None:
        widen_v_in_registers = fp8_cache and compute_dtype == torch.float16
    group = num_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    out = torch.empty_like(q)
    if splits > 1:
        part_acc = torch.empty(batch * num_heads * splits, head_dim, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(batch * num_heads * splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out
    on = pdl(batch)
    consts = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, USE_PDL=on, launch_pdl=on)
    _paged_decode_kernel[(batch, num_kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_acc,
        part_ml,
        scale,
        block_tables.stride(0),
        batch,  # at most this many new tokens a sequence this step (rows computed as one: all of them)
        **consts,
        GROUP_PAD=group_pad,
        EARLY=early_loads(on),
        AHEAD=launch_ahead(on, "attention"),
        BLOCK_SIZE=block_size,
        TILE=tile,
        SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        COMPUTE=_TL_DTYPES[compute_dtype],
        WIDEN_V_IN_REGISTERS=widen_v_in_registers,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            out,
            part_acc,
            part_ml,
            context_lens,
            **consts,
            TILE=tile,
            SPLITS=splits,
            SPLITS_POW2=triton.next_power_of_2(splits),
            EARLY=early_loads(on),
            AHEAD=launch_ahead(on, "merge"),
            num_warps=4,
        )
    return out
