"""Paged decode attention as a Triton kernel (CUDA only).

One program per (sequence, KV head): it loads the query heads of that KV head's group, walks the
sequence's block table TILE tokens at a time and keeps an online softmax, so K/V are read once
per group whatever the GQA ratio. Shapes are static per batch, so CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    scale,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx_len = tl.load(context_lens_ptr + seq)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_g
    q_mask = offs_g < GROUP
    q = tl.load(q_ptr + (seq * NUM_KV_HEADS * GROUP + head)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=q_mask[:, None], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    token_stride = NUM_KV_HEADS * HEAD_DIM
    block_stride = BLOCK_SIZE * token_stride

    for start in range(0, ctx_len, TILE):
        offs_t = start + tl.arange(0, TILE)
        t_mask = offs_t < ctx_len
        blocks = tl.load(block_tables_ptr + seq * stride_bt + offs_t // BLOCK_SIZE, mask=t_mask, other=0)
        base = blocks.to(tl.int64) * block_stride + (offs_t % BLOCK_SIZE) * token_stride + kv_head * HEAD_DIM
        k = tl.load(k_cache_ptr + base[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + base[:, None] + offs_d[None, :], mask=t_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m = m_new

    out = acc / l[:, None]
    tl.store(out_ptr + (seq * NUM_KV_HEADS * GROUP + head)[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, W]; context_lens [B]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale, block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    return out
