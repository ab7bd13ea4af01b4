"""Absorbed MLA decode over the latent paged cache, as a Triton kernel (and its torch reference).

DeepSeek-V2/V3 decode with W_UK folded into the query reads, per cached token, only the latent
(kv_lora_rank values, 512) and the shared rope key (64): scores = (q_latent . c + q_rope . k_rope)
* scale, out = softmax . c, and W_UV is applied to `out` afterwards. Every head of a sequence reads
the same latent, so one program takes a block of heads and each latent tile is loaded once for
both products (scores and p @ c), the way FlashMLA does (3,000 GB/s memory-bound on H800).

Grid: (head block, sequence, split). A batch too small to fill the GPU has its context split
across programs (flash-decoding) and a second kernel merges the partial softmaxes. The split count
depends only on the batch and head count, never on the context lengths (read on the device), so
the launch is fixed for a batch bucket and a CUDA graph captures it; nothing syncs with the host.

Two kernels, chosen by head count (`mla_decode` dispatches):

- narrow (`_mla_decode_kernel`): blocks of 16-32 heads, for V2-Lite's 16. 2,196 GB/s on the H200
  at 16 heads x batch 64 x 4k, but at V3's 128 heads only 81 TFLOP/s: a 32-head block is below
  Hopper's wgmma (64 rows), so ptxas emits mma.sync, and each latent tile is read by 4 programs.
- wide (`_mla_decode_wide_kernel`), FlashMLA's structure for >= 64 heads: a program takes 64
  heads of one sequence (they share the latent, so it is a GEMM [64 x 576] x [576 x tokens], then
  [64 x tokens] x [tokens x 512]), the query tile in shared memory, each latent tile loaded once
  into shared memory and used for both products, online softmax, split-K with the same merge.
  Its launch comes from `WIDE_CONFIGS`, the table runtime/bench/bench_mla.py fills.
  A known cost, read off the sm_90a PTX (not yet measured): Triton lays a dot whose result feeds
  another dot with all its warps along M, so at 64 rows both warpgroups of a program compute the
  same 64 x BLOCK_N scores (72 of the 76 wgmma a tile are theirs, m64n32k16) and each then takes
  256 of the 512 output columns: 1.5x the useful tensor work. FlashMLA has one warpgroup compute
  the scores and share P through shared memory; Triton's heuristic cannot be steered past it
  here (the scores reach the accumulator through the softmax rescale too), Gluon could.
"""

from __future__ import annotations

import functools

import torch

try:  # CPU-only installs run the reference; the kernel needs triton (CUDA, or its interpreter)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode in plain torch, float32: one query per sequence against its cached latents.

    q_latent [B, H, kv_lora] (the no-rope query times W_UK), q_rope [B, H, rope],
    latent_cache [num_blocks, block_size, kv_lora + rope], block_tables [B, max_blocks] int32,
    context_lens [B] int32 -> [B, H, kv_lora] in q_latent's dtype: softmax(scale * (q_latent.c +
    q_rope.k_rope)) weighted sum of c. Static shapes (a length mask, no per-sequence loop):
    capturable, and the CPU engine's decode."""
    kv_lora = q_latent.shape[-1]
    entries = latent_cache[block_tables.long()].flatten(1, 2).float()  # [B, T, kv_lora + rope]
    latent = entries[..., :kv_lora]
    scores = torch.einsum("bhc,btc->bht", q_latent.float(), latent)
    scores = scores + torch.einsum("bhr,btr->bht", q_rope.float(), entries[..., kv_lora:])
    valid = torch.arange(entries.shape[1], device=q_latent.device)[None, :] < context_lens[:, None]
    probs = (scores * scale).masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bht,btc->bhc", probs, latent).to(q_latent.dtype)


def num_splits(batch: int, head_blocks: int, sm_count: int) -> int:
    """Programs enough to cover the GPU about twice, at most 64 splits of a context; one split once
    the batch fills it alone. A function of the launch shape only, so a captured graph stays valid
    for any context length. At kv_lora 512 a program takes a whole SM's registers (205-251 a
    thread, 256 threads), so a 16-head batch of one needs 64 splits to cover half the H200's
    132 SMs (32 left it at 316 GB/s); the merge's partials (2 KB a head and split) stay well
    under the 4,096-token context's 4.7 MB."""
    return max(1, min(64, (2 * sm_count) // max(1, batch * head_blocks)))


def mla_decode_fits(kv_lora: int, rope: int) -> bool:
    """Whether the kernel takes these widths (tl.dot and tl.arange want powers of two >= 16); the
    published models' 512 and 64 do, some tiny test models do not and take the reference."""
    return triton is not None and all(n >= 16 and n & (n - 1) == 0 for n in (kv_lora, rope))


def default_block_h(num_heads: int, kv_lora: int) -> int:
    """Heads per program. Every head block re-reads the sequence's latent tiles, so the block is as
    large as registers allow: the [BLOCK_H, KV_LORA] float32 accumulator and the query beside it.
    At kv_lora 512 and 8 warps ptxas fits 32 heads with 32-token tiles (251 registers, no spills;
    64 heads spill 300-1,300 bytes a thread at 8 or 16 warps), so V3's 128 heads read each tile 4
    times, not 8 as with blocks of 16 (the H200 sweep: 1.4x at batch 64, equal at batch 1-16).
    (Those spills were ptxas on PTX compiled without the 16-byte divisibility a real launch gives
    its pointers and strides; with it, 64 heads at tile 32 take 223 registers and no spills, and
    only blocks of 64 reach wgmma. From 64 heads `mla_decode` takes the wide kernel instead.)"""
    cap = 64 if kv_lora <= 256 else 32
    return min(cap, max(16, triton.next_power_of_2(num_heads)))


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's SM count, which the split heuristics of both decode kernels scale with."""
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


# Heads from which `mla_decode` takes the wide kernel: 64 fill one wgmma tile (fewer pad it).
WIDE_MIN_HEADS = 64
WIDE_BLOCK_H = 64

# The wide kernel's launch per batch bucket (the smallest key >= the batch; past the largest, the
# largest). Keys and fields are exactly what runtime/bench/bench_mla.py prints under "table", so a
# run's winners paste in. block_n: tokens a tile; halves: the latent's 512 columns as one or two
# dots (two accumulators of 256); waves: programs per SM to aim the split count at; max_splits
# caps the split-K (each split writes 128 KB of float32 partials for a 64-head block, which the
# merge reads back). Ahead of any GPU measurement, ptxas (sm_90a, test_deepseek_kernels.py) fits
# block_n 64 at 8 warps and 2 stages in 255 registers without spills, 216 KB of shared memory
# (the query's 72 KB plus two 72 KB tiles) of Hopper's 227 KB a block.
WIDE_CONFIGS: dict[int, dict] = {
    1: dict(block_n=64, num_warps=8, num_stages=2, halves=1, waves=1, max_splits=32),
    16: dict(block_n=64, num_warps=8, num_stages=2, halves=1, waves=1, max_splits=32),
    64: dict(block_n=64, num_warps=8, num_stages=2, halves=1, waves=1, max_splits=32),
}
WIDE_FIELDS = ("block_n", "num_warps", "num_stages", "halves", "waves", "max_splits")


def check_wide_config(config: dict, kv_lora: int = 512) -> dict:
    """A launch for the wide kernel, refused with the field at fault (a table row pasted from a
    bench run, or the bench's own candidates)."""
    if set(config) != set(WIDE_FIELDS):
        raise ValueError(f"a wide launch needs exactly the fields {WIDE_FIELDS}, got {tuple(sorted(config))}")
    for name in WIDE_FIELDS:
        if not isinstance(config[name], int) or config[name] < 1:
            raise ValueError(f"wide launch field {name} must be a positive integer, got {config[name]!r}")
    block_n, halves = config["block_n"], config["halves"]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"wide launch block_n must be a power of two >= 16 (a wgmma tile), got {block_n}")
    if halves not in (1, 2) or kv_lora // halves < 16:
        raise ValueError(f"wide launch halves must be 1 or 2 (the latent's columns in one or two dots), got {halves}")
    if config["num_warps"] not in (4, 8, 16):
        raise ValueError(f"wide launch num_warps must be 4, 8 or 16, got {config['num_warps']}")
    return config


def install_wide_table(table: dict) -> None:
    """Take a bench_mla.py result's "table" ({"WIDE_CONFIGS": {batch: launch}, "WIDE_MIN_HEADS": n},
    JSON's string keys allowed) as the dispatch's launches, every row checked first so a bad table
    changes nothing. The rows belong pasted into this file; this lets a run try them first."""
    rows = table.get("WIDE_CONFIGS")
    if not isinstance(rows, dict) or not rows:
        raise ValueError('a wide table needs "WIDE_CONFIGS": {batch: launch, ...} with at least one row')
    checked = {}
    for batch, row in rows.items():
        if not str(batch).isdigit() or int(batch) < 1:
            raise ValueError(f"wide table batch bucket {batch!r} must be a positive integer")
        checked[int(batch)] = check_wide_config(dict(row))
    min_heads = table.get("WIDE_MIN_HEADS", WIDE_MIN_HEADS)
    if not isinstance(min_heads, int) or min_heads < 1:
        raise ValueError(f"WIDE_MIN_HEADS must be a positive integer, got {min_heads!r} (null: the wide kernel never won)")
    globals().update(WIDE_CONFIGS=checked, WIDE_MIN_HEADS=min_heads)


def wide_config(batch: int) -> dict:
    """The table's launch for a batch: its bucket is the smallest key >= batch, else the largest."""
    key = min((k for k in WIDE_CONFIGS if k >= batch), default=max(WIDE_CONFIGS))
    return WIDE_CONFIGS[key]


def wide_splits(batch: int, head_blocks: int, sms: int, waves: int, max_splits: int) -> int:
    """Splits of each context so the programs fill `waves` programs per SM without a partial extra
    wave (the wide kernel's shared memory allows one program an SM): V3's 128 heads at batch 64
    are 128 programs, one wave of the H200's 132 SMs, no split. A function of the launch shape
    only, as `num_splits`, so a captured graph holds for any context length."""
    return max(1, min(max_splits, (sms * waves) // max(1, batch * head_blocks)))


if triton is not None:

    @triton.jit
    def _mla_decode_kernel(
        q_lat_ptr,
        q_rope_ptr,
        cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        out_ptr,
        part_acc_ptr,
        part_ml_ptr,
        scale,
        stride_bt,
        stride_cache_block,
        stride_cache_token,
        NUM_HEADS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        KV_LORA: tl.constexpr,
        ROPE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        SPLITS: tl.constexpr,
        LORA_PARTS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Head blocks vary fastest: the programs reading one sequence's latent run side by side
        # and share its tiles in L2 (V3's 128 heads are four blocks of 32).
        # LORA_PARTS programs share a head block, each accumulating its slice of the latent's
        # columns (all compute the full scores): a [BLOCK_H, KV_LORA / LORA_PARTS] accumulator
        # lets 64 heads fit in registers, and the parts, adjacent in the grid, read the same
        # tiles (one from HBM, the others from L2).
        head_block = tl.program_id(0) // LORA_PARTS
        lora_part = tl.program_id(0) % LORA_PARTS
        seq = tl.program_id(1)
        split = tl.program_id(2)
        ctx_len = tl.load(context_lens_ptr + seq)
        tiles = tl.cdiv(ctx_len, TILE)
        per_split = tl.cdiv(tiles, SPLITS)
        lo = split * per_split * TILE
        hi = tl.minimum((split + 1) * per_split * TILE, ctx_len)

        offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < NUM_HEADS
        offs_l = tl.arange(0, KV_LORA)
        offs_r = tl.arange(0, ROPE)
        offs_o = lora_part * (KV_LORA // LORA_PARTS) + tl.arange(0, KV_LORA // LORA_PARTS)
        row = seq * NUM_HEADS + offs_h
        q_lat = tl.load(q_lat_ptr + row[:, None] * KV_LORA + offs_l[None, :], mask=h_mask[:, None], other=0.0)
        q_rope = tl.load(q_rope_ptr + row[:, None] * ROPE + offs_r[None, :], mask=h_mask[:, None], other=0.0)

        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, KV_LORA // LORA_PARTS], dtype=tl.float32)
        for start in range(lo, hi, TILE):
            offs_t = start + tl.arange(0, TILE)
            t_mask = offs_t < hi
            blocks = tl.load(block_tables_ptr + seq * stride_bt + offs_t // BLOCK_SIZE, mask=t_mask, other=0)
            base = blocks.to(tl.int64) * stride_cache_block + (offs_t % BLOCK_SIZE) * stride_cache_token
            c = tl.load(cache_ptr + base[:, None] + offs_l[None, :], mask=t_mask[:, None], other=0.0).to(q_lat.dtype)
            k_rope = tl.load(cache_ptr + base[:, None] + KV_LORA + offs_r[None, :], mask=t_mask[:, None], other=0.0).to(
                q_lat.dtype
            )
            s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
            s += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
            s = tl.where(t_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, 1)
            if LORA_PARTS == 1:
                c_o = c
            else:
                c_o = tl.load(cache_ptr + base[:, None] + offs_o[None, :], mask=t_mask[:, None], other=0.0).to(q_lat.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(c_o.dtype), c_o, input_precision=PRECISION)
            m = m_new

        if SPLITS == 1:
            out = acc / denom[:, None]
            tl.store(out_ptr + row[:, None] * KV_LORA + offs_o[None, :], out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
        else:
            part = (row * SPLITS + split).to(tl.int64)
            tl.store(part_acc_ptr + part[:, None] * KV_LORA + offs_o[None, :], acc, mask=h_mask[:, None])
            ml_mask = h_mask & (lora_part == 0)  # every part has the same m and denom
            tl.store(part_ml_ptr + part * 2, m, mask=ml_mask)
            tl.store(part_ml_ptr + part * 2 + 1, denom, mask=ml_mask)

    @triton.jit
    def _mla_merge_kernel(
        out_ptr,
        part_acc_ptr,
        part_ml_ptr,
        KV_LORA: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        """One program per (sequence, head): the partial softmaxes of its splits, rescaled to their
        common maximum, one split at a time (registers for one row whatever the split count). An
        empty split (m = -inf, denom = 0) weighs nothing."""
        row = tl.program_id(0).to(tl.int64)
        base = row * SPLITS
        m = tl.load(part_ml_ptr + base * 2)
        for split in range(1, SPLITS):
            m = tl.maximum(m, tl.load(part_ml_ptr + (base + split) * 2))
        offs_l = tl.arange(0, KV_LORA)
        acc = tl.zeros([KV_LORA], dtype=tl.float32)
        denom = 0.0
        for split in range(SPLITS):
            m_s = tl.load(part_ml_ptr + (base + split) * 2)
            w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m))
            denom += tl.load(part_ml_ptr + (base + split) * 2 + 1) * w
            acc += tl.load(part_acc_ptr + (base + split) * KV_LORA + offs_l) * w
        tl.store(out_ptr + row * KV_LORA + offs_l, (acc / denom).to(out_ptr.dtype.element_ty))


if triton is not None:

    @triton.jit
    def _mla_decode_wide_kernel(
        q_lat_ptr,
        q_rope_ptr,
        cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        out_ptr,
        part_acc_ptr,
        part_ml_ptr,
        scale_log2,
        splits,
        num_heads,
        stride_bt,
        stride_cache_block,
        stride_cache_token,
        BLOCK_H: tl.constexpr,
        KV_LORA: tl.constexpr,
        ROPE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HALVES: tl.constexpr,
        DOT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # `splits` and `num_heads` are runtime arguments: another batch bucket or head count reuses
        # the compiled kernel (Triton specializes splits == 1, which drops the partials' path).
        # The query is loop-invariant and a wgmma operand, so it stays in shared memory for the
        # whole context; each latent tile is loaded once (pipelined into shared memory) and feeds
        # both the scores (its 512 + 64 columns) and p @ c (its first 512).
        head_block = tl.program_id(0)
        seq = tl.program_id(1)
        split = tl.program_id(2)
        ctx_len = tl.load(context_lens_ptr + seq)
        per_split = tl.cdiv(tl.cdiv(ctx_len, BLOCK_N), splits)
        lo = split * per_split * BLOCK_N
        hi = tl.minimum((split + 1) * per_split * BLOCK_N, ctx_len)

        W: tl.constexpr = KV_LORA // HALVES
        offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < num_heads
        row = seq * num_heads + offs_h
        offs_w = tl.arange(0, W)
        offs_r = tl.arange(0, ROPE)
        q_row = q_lat_ptr + row[:, None] * KV_LORA + offs_w[None, :]
        q0 = tl.load(q_row, mask=h_mask[:, None], other=0.0).to(DOT)
        q1 = q0
        if HALVES == 2:
            q1 = tl.load(q_row + W, mask=h_mask[:, None], other=0.0).to(DOT)
        q_rope = tl.load(q_rope_ptr + row[:, None] * ROPE + offs_r[None, :], mask=h_mask[:, None], other=0.0).to(DOT)

        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # base-2 units: exp2 is one MUFU op
        denom = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_H, W], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_H, W], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_t = start + tl.arange(0, BLOCK_N)
            t_mask = offs_t < hi
            blocks = tl.load(block_tables_ptr + seq * stride_bt + offs_t // BLOCK_SIZE, mask=t_mask, other=0)
            base = blocks.to(tl.int64) * stride_cache_block + (offs_t % BLOCK_SIZE) * stride_cache_token
            tile = cache_ptr + base[:, None] + offs_w[None, :]
            c0 = tl.load(tile, mask=t_mask[:, None], other=0.0).to(DOT)
            k_rope = tl.load(cache_ptr + base[:, None] + KV_LORA + offs_r[None, :], mask=t_mask[:, None], other=0.0)
            s = tl.dot(q0, tl.trans(c0), input_precision=PRECISION)
            c1 = c0
            if HALVES == 2:
                c1 = tl.load(tile + W, mask=t_mask[:, None], other=0.0).to(DOT)
                s = tl.dot(q1, tl.trans(c1), s, input_precision=PRECISION)
            s = tl.dot(q_rope, tl.trans(k_rope.to(DOT)), s, input_precision=PRECISION)
            s = tl.where(t_mask[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            denom = denom * alpha + tl.sum(p, 1)
            p = p.to(DOT)
            acc0 = tl.dot(p, c0, acc0 * alpha[:, None], input_precision=PRECISION)
            if HALVES == 2:
                acc1 = tl.dot(p, c1, acc1 * alpha[:, None], input_precision=PRECISION)
            m = m_new

        out_row = row[:, None] * KV_LORA + offs_w[None, :]
        if splits == 1:
            tl.store(out_ptr + out_row, (acc0 / denom[:, None]).to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
            if HALVES == 2:
                tl.store(out_ptr + out_row + W, (acc1 / denom[:, None]).to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
        else:
            part = (row * splits + split).to(tl.int64)
            part_row = part[:, None] * KV_LORA + offs_w[None, :]
            tl.store(part_acc_ptr + part_row, acc0, mask=h_mask[:, None])
            if HALVES == 2:
                tl.store(part_acc_ptr + part_row + W, acc1, mask=h_mask[:, None])
            # the merge (shared with the narrow kernel) works in natural-log units
            tl.store(part_ml_ptr + part * 2, m * 0.6931471805599453, mask=h_mask)
            tl.store(part_ml_ptr + part * 2 + 1, denom, mask=h_mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if triton else {}


def _check_latent_args(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("mla_decode needs triton (pip install triton); on CPU use mla_decode_reference")
    kv_lora, rope = q_latent.shape[-1], q_rope.shape[-1]
    if latent_cache.shape[-1] != kv_lora + rope:
        raise ValueError(f"latent_cache rows hold {latent_cache.shape[-1]} values, expected kv_lora + rope = {kv_lora + rope}")
    for name, size in (("kv_lora_rank", kv_lora), ("qk_rope_head_dim", rope)):
        if size & (size - 1) or size < 16:
            raise ValueError(f"mla_decode needs {name} a power of two >= 16, got {size}")
    if latent_cache.stride(-1) != 1:
        raise ValueError("latent_cache must have contiguous rows (stride 1 on the last axis)")


def mla_decode_wide(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    config: dict | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """The wide kernel (64 heads a program); shapes as `mla_decode_reference`, context_lens >= 1.
    `config` (fields WIDE_FIELDS) overrides the table's launch, `splits` the split count derived
    from it (bench_mla.py and the tests use both)."""
    _check_latent_args(q_latent, q_rope, latent_cache)
    batch, num_heads, kv_lora = q_latent.shape
    config = check_wide_config(config if config is not None else wide_config(batch), kv_lora)
    q_latent, q_rope = q_latent.contiguous(), q_rope.contiguous()
    head_blocks = triton.cdiv(num_heads, WIDE_BLOCK_H)
    if splits is None:
        splits = wide_splits(batch, head_blocks, sm_count(q_latent.device), config["waves"], config["max_splits"])
    out = torch.empty_like(q_latent)
    part_acc, part_ml = _partials(out, batch * num_heads * splits, kv_lora) if splits > 1 else (out, out)
    _mla_decode_wide_kernel[(head_blocks, batch, splits)](
        q_latent,
        q_rope,
        latent_cache,
        block_tables,
        context_lens,
        out,
        part_acc,
        part_ml,
        scale * 1.4426950408889634,  # log2(e): the kernel's softmax runs on exp2
        splits,
        num_heads,
        block_tables.stride(0),
        latent_cache.stride(0),
        latent_cache.stride(1),
        BLOCK_H=WIDE_BLOCK_H,
        KV_LORA=kv_lora,
        ROPE=q_rope.shape[-1],
        BLOCK_SIZE=latent_cache.shape[1],
        BLOCK_N=config["block_n"],
        HALVES=config["halves"],
        # Triton's interpreter (CPU tensors) multiplies bf16 wrongly; it checks the indexing in float32
        DOT=tl.float32 if q_latent.device.type != "cuda" else _TL_DTYPES[q_latent.dtype],
        PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if splits > 1:
        _mla_merge_kernel[(batch * num_heads,)](out, part_acc, part_ml, KV_LORA=kv_lora, SPLITS=splits, num_warps=4)
    return out


def _partials(out: torch.Tensor, rows: int, kv_lora: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's unnormalised output and its (max, denominator), float32, for the merge."""
    acc = torch.empty(rows, kv_lora, device=out.device, dtype=torch.float32)
    return acc, torch.empty(rows, 2, device=out.device, dtype=torch.float32)


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    kernel: str = "auto",
    **launch,
) -> torch.Tensor:
    """Absorbed MLA decode on the GPU; shapes as `mla_decode_reference`, context_lens >= 1 each.
    kernel "auto" takes the wide kernel from WIDE_MIN_HEADS heads in bf16/fp16 and the narrow one
    otherwise, or whenever the narrow kernel's launch keywords (`mla_decode_narrow`'s) are given,
    as the sweeps of bench_deepseek.py do; "wide" and "narrow" force one. No host sync either way."""
    if kernel not in ("auto", "wide", "narrow"):
        raise ValueError(f"mla_decode kernel must be 'auto', 'wide' or 'narrow', got {kernel!r}")
    if kernel == "auto":
        # float32's query and tiles (twice bf16's bytes) overflow the wide kernel's shared memory
        wide = q_latent.shape[1] >= WIDE_MIN_HEADS and q_latent.element_size() == 2 and not launch
        kernel = "wide" if wide else "narrow"
    if kernel == "wide":
        return mla_decode_wide(q_latent, q_rope, latent_cache, block_tables, context_lens, scale, **launch)
    return mla_decode_narrow(q_latent, q_rope, latent_cache, block_tables, context_lens, scale, **launch)


def mla_decode_narrow(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    splits: int | None = None,
    tile: int | None = None,
    block_h: int | None = None,
    lora_parts: int = 1,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """The narrow kernel (16-32 heads a program); shapes as `mla_decode_reference`. The keyword
    arguments override the launch (bench/bench_deepseek.py sweeps them)."""
    _check_latent_args(q_latent, q_rope, latent_cache)
    batch, num_heads, kv_lora = q_latent.shape
    rope = q_rope.shape[-1]
    q_latent, q_rope = q_latent.contiguous(), q_rope.contiguous()
    block_h = block_h or default_block_h(num_heads, kv_lora)
    head_blocks = triton.cdiv(num_heads, block_h)
    if (
        lora_parts < 1
        or kv_lora % lora_parts
        or (kv_lora // lora_parts) & (kv_lora // lora_parts - 1)
        or kv_lora // lora_parts < 16
    ):
        raise ValueError(f"lora_parts {lora_parts} must split kv_lora_rank {kv_lora} into powers of two >= 16")
    splits = splits or num_splits(batch, head_blocks * lora_parts, sm_count(q_latent.device))
    tile = tile or 32
    out = torch.empty_like(q_latent)
    part_acc, part_ml = _partials(out, batch * num_heads * splits, kv_lora) if splits > 1 else (out, out)
    _mla_decode_kernel[(head_blocks * lora_parts, batch, splits)](
        q_latent,
        q_rope,
        latent_cache,
        block_tables,
        context_lens,
        out,
        part_acc,
        part_ml,
        scale,
        block_tables.stride(0),
        latent_cache.stride(0),
        latent_cache.stride(1),
        NUM_HEADS=num_heads,
        BLOCK_H=block_h,
        KV_LORA=kv_lora,
        ROPE=rope,
        BLOCK_SIZE=latent_cache.shape[1],
        TILE=tile,
        SPLITS=splits,
        LORA_PARTS=lora_parts,
        PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
        num_warps=num_warps or (8 if kv_lora >= 512 else 4),
        num_stages=num_stages,
    )
    if splits > 1:
        _mla_merge_kernel[(batch * num_heads,)](out, part_acc, part_ml, KV_LORA=kv_lora, SPLITS=splits, num_warps=4)
    return out
