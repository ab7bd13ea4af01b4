"""Paged attention. The KV cache of one layer is [num_blocks, block_size, num_kv_heads, head_dim]
for K and for V; a sequence's tokens live in the blocks its block table lists.

The pure-PyTorch path below is the readable reference and runs everywhere; on CUDA, decode uses
the Triton kernel in paged_decode.py. A new cache layout (MLA's one latent per token) comes as a
new attention class with the same interface: forward(q, k, v) reading the step's context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.context import get_context
from inferd.layers.fused import FP8, FP8_MAX


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K/V in the cache's element type; an fp8 cache (unit scale) saturates at +-448."""
    if x.dtype == dtype:
        return x
    if dtype == FP8:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[-2:]
    for new, cache in ((k, k_cache), (v, v_cache)):
        new = to_cache_dtype(new, cache.dtype)
        if cache.dtype.itemsize == 1:  # index_copy_ has no fp8 kernels on every device: copy the bytes
            new, cache = new.view(torch.uint8), cache.view(torch.uint8)
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, new)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached tokens, [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def prefill_attention_reference(q, k, v, k_cache, v_cache, ctx, scale: float) -> torch.Tensor:
    """Causal attention for prompt chunks; a chunk also sees its sequence's cached context."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(ctx.query_lens, ctx.context_lens_list)):
        qs = q[start : start + q_len].transpose(0, 1)  # [H, q_len, D]
        if ctx_len == q_len:
            ks, vs = k[start : start + q_len], v[start : start + q_len]
        else:
            ks = gather_context(k_cache, ctx.block_tables[i], ctx_len).to(q.dtype)  # an fp8 cache widens
            vs = gather_context(v_cache, ctx.block_tables[i], ctx_len).to(q.dtype)
        # 4-D inputs: SDPA's flash and memory-efficient kernels take nothing else.
        ks = ks.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        vs = vs.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        if ctx_len == q_len:
            o = F.scaled_dot_product_attention(qs[None], ks, vs, is_causal=True, scale=scale)
        else:
            # Query j sits at absolute position ctx_len - q_len + j and sees keys up to it.
            qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qs[None], ks, vs, attn_mask=mask, scale=scale)
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def prefill_attention_varlen(q, k, v, ctx, scale: float) -> torch.Tensor:
    """Causal attention for a batch of fresh prompts in one FlashAttention call (CUDA, half
    precision): the sequences lie back to back in the flat batch, `cu_seqlens` says where. Grouped
    K/V heads are read as they are. Equal to the reference loop, which launches a few kernels per
    sequence and layer (a 16-prompt prefill step: hundreds per layer)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_query_len, ctx.max_query_len, 0.0, True, False, scale=scale
    )[0]


def decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per sequence against its whole cached context, batched with a length mask
    (static shapes, so it can also be captured in a CUDA graph)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = k_cache[block_tables].flatten(1, 2)  # [B, T, Hkv, D]
    values = v_cache[block_tables].flatten(1, 2)
    qg = q.view(batch, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bhgd,bthd->bhgt", qg, keys.float()) * scale
    valid = torch.arange(keys.shape[1], device=q.device)[None, :] < context_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, values.float())
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


# What one gather of cached contexts may take (K and V of one layer, in the model's dtype), beside
# the KV cache's 10 % of headroom: a batch whose contexts hold more is attended in groups
# (`group_contexts`). The prefix-heavy load's prefill steps (about 80 hits of 1,600 tokens on the
# 8B shape) gather 0.54 GB, one group; 256 contexts of 8,192 tokens would take 8.
PAGED_PREFILL_BYTES = 1 << 30


@dataclass
class ContextGroup:
    """Sequences [first, last) of a prefill over cached contexts, attended in one call: their query
    rows [q_start, q_end) of the flat batch, their whole contexts as cache slots back to back, and
    both offset arrays ([n + 1] int32) and maxima."""

    q_start: int
    q_end: int
    slots: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_query_len: int
    max_context_len: int


def group_contexts(context_lens: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sequences whose contexts sum to at most max_tokens (a longer one alone)."""
    groups, first, total = [], 0, 0
    for i, n in enumerate(context_lens):
        if i > first and total + n > max_tokens:
            groups.append((first, i))
            first, total = i, 0
        total += n
    return groups + [(first, len(context_lens))] if context_lens else groups


def prefill_attention_paged_varlen(q, k_cache, v_cache, ctx, scale: float) -> torch.Tensor:
    """Causal attention for prompt chunks that continue a cached context (a prefix-cache hit, a
    chunked prompt) in one FlashAttention call per `ContextGroup` (CUDA, half precision): each
    sequence's whole context, the chunk's own K/V included (stored before this runs), is gathered
    from the paged cache by slot, one index_select per cache, and each chunk's queries are aligned
    to the end of their context (FlashAttention's causal mask for fewer queries than keys). Equal
    to the reference loop, which launches a few kernels per sequence and layer: a prefill of 256
    prefix-cache hits spent 1.8 s a step there (BENCHMARKS.md)."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    outs = []
    for g in ctx.context_groups:  # consecutive, covering every query row in order
        keys, values = (_gather_slots(cache, g.slots, num_kv_heads, head_dim, q.dtype) for cache in (k_cache, v_cache))
        o = torch.ops.aten._flash_attention_forward(
            q[g.q_start : g.q_end],
            keys,
            values,
            g.cu_seqlens_q,
            g.cu_seqlens_k,
            g.max_query_len,
            g.max_context_len,
            0.0,
            True,
            False,
            scale=scale,
        )[0]
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _gather_slots(cache: torch.Tensor, slots: torch.Tensor, num_kv_heads: int, head_dim: int, dtype) -> torch.Tensor:
    flat = cache.view(-1, num_kv_heads, head_dim)
    if flat.dtype.itemsize == 1:  # fp8: gathered as bytes (not every device has fp8 index kernels), then widened
        return flat.view(torch.uint8).index_select(0, slots).view(flat.dtype).to(dtype)
    return flat.index_select(0, slots).to(dtype)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.tensor([])  # bound by the model runner
        self.use_triton = False

    # The model runner sizes and binds caches through these two (models/deepseek.py's MLA has its own).
    def kv_cache_layout(self, dtype: torch.dtype) -> tuple[int, tuple[int, ...]]:
        """(cache tensors per layer, shape of one token's entry in each): K and V."""
        return 2, (self.num_kv_heads, self.head_dim)

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_cache.numel():
            if self.use_triton:
                from inferd.layers.paged_decode import store_kv_triton

                store_kv_triton(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
            else:
                store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill and self.k_cache.dtype.itemsize < k.dtype.itemsize:
            # A narrower cache (fp8): the prompt attends to its K/V as the cache holds them, as
            # later tokens, a prefix-cache hit or a recomputation after preemption will.
            k = to_cache_dtype(k, self.k_cache.dtype).to(q.dtype)
            v = to_cache_dtype(v, self.v_cache.dtype).to(q.dtype)
        varlen = ctx.is_prefill and ctx.cu_seqlens is not None and self.use_triton and q.dtype in (torch.bfloat16, torch.float16)
        if varlen and ctx.context_groups is not None and self.k_cache.numel():
            o = prefill_attention_paged_varlen(q, self.k_cache, self.v_cache, ctx, self.scale)
        elif varlen and ctx.context_groups is None and ctx.block_tables is None:
            o = prefill_attention_varlen(q, k, v, ctx, self.scale)
        elif ctx.is_prefill:
            o = prefill_attention_reference(q, k, v, self.k_cache, self.v_cache, ctx, self.scale)
        elif self.use_triton:
            from inferd.layers.paged_decode import num_splits, paged_decode_attention, sm_count

            # Rows computed as one: each context split as a batch-1 step splits it (the same sums).
            splits = num_splits(1, self.num_kv_heads, sm_count(q.device)) if ctx.rows_as_one else None
            o = paged_decode_attention(
                q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale, splits=splits
            )
        else:
            o = decode_attention_reference(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale)
        return o.reshape(-1, self.num_heads * self.head_dim)
