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
    times, not 8 as with blocks of 16 (the H200 sweep: 1.4x at batch 64, equal at batch 1-16)."""
    cap = 64 if kv_lora <= 256 else 32
    return min(cap, max(16, triton.next_power_of_2(num_heads)))


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's SM count, which the split heuristics of both decode kernels scale with."""
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


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


def mla_decode(
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
    """The kernel; shapes as `mla_decode_reference`. Every sequence needs context_lens >= 1.
    The keyword arguments override the launch (bench/bench_deepseek.py sweeps them)."""
    if triton is None:
        raise RuntimeError("mla_decode needs triton (pip install triton); on CPU use mla_decode_reference")
    batch, num_heads, kv_lora = q_latent.shape
    rope = q_rope.shape[-1]
    if latent_cache.shape[-1] != kv_lora + rope:
        raise ValueError(f"latent_cache rows hold {latent_cache.shape[-1]} values, expected kv_lora + rope = {kv_lora + rope}")
    for name, size in (("kv_lora_rank", kv_lora), ("qk_rope_head_dim", rope)):
        if size & (size - 1) or size < 16:
            raise ValueError(f"mla_decode needs {name} a power of two >= 16, got {size}")
    if latent_cache.stride(-1) != 1:
        raise ValueError("latent_cache must have contiguous rows (stride 1 on the last axis)")
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
    if splits > 1:
        part_acc = torch.empty(batch * num_heads * splits, kv_lora, device=out.device, dtype=torch.float32)
        part_ml = torch.empty(batch * num_heads * splits, 2, device=out.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out
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
