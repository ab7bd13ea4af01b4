"""Routed experts of a mixture-of-experts layer, all tokens at once (and the torch reference).

fused_moe(hidden [T, D], w13 [E, 2I, D], w2 [E, D, I], topk_weights [T, k], topk_ids [T, k]):
each token's k chosen experts compute SiLU(gate) * up (gate the first I rows of w13) then w2, and
their outputs are summed with the routing weights. The T*k (token, expert) pairs are sorted by
expert on the device, then each projection is one grouped GEMM over all experts:

- bf16 weights on Hopper: `torch._grouped_mm` (2-D activations x 3-D weights, group ends in an
  int32 `offs` tensor), cuBLAS/CUTLASS's grouped kernel: no tuning of ours, and the group sizes
  stay on the device;
- fp8 block-scaled weights (the V3/R1 checkpoints), or any other GPU: the Triton grouped GEMM of
  fp8_block.py, over row tiles of BLOCK_M pairs of one expert (`align_by_expert`), the activations
  quantized per token and 128-group as for the linear layers.

Nothing here reads a value back to the host: the sort, the counts (scatter_add, not bincount,
which sizes its output from the data), the tile table and the grids depend only on T, k and E,
so a decode step with its MoE layers is captured in one CUDA graph per batch bucket.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferd.layers.fp8_block import FP8, act_quant, check_block_scales, fp8_block_linear_reference, grouped_gemm


def fused_moe_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A loop over the experts, products in float32 rounded to hidden's dtype (as the kernels and
    the reference inference code store them), as the reference inference code runs them. fp8 weights
    (with their [E, N/128, K/128] scales) take the arithmetic of `fp8_block_linear_reference`:
    activations quantized per token and 128-group, weights dequantized by block."""
    inter = w2.shape[-1]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)

    def project(a, e, w, scale):
        # each projection's output is rounded to the activations' dtype, as the kernels store it
        # (and DeepSeek's bf16 inference code): the second projection quantizes exactly those
        # values to fp8, so a float32 intermediate would round ~0.1% of them across an fp8 step
        if scale is not None:
            return fp8_block_linear_reference(a.float(), w[e], scale[e]).to(hidden.dtype)
        return (a.float() @ w[e].float().T).to(hidden.dtype)

    for e in topk_ids.unique().tolist():
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = project(hidden[token], e, w13, w13_scale)
        y = project(F.silu(h[:, :inter]) * h[:, inter:], e, w2, w2_scale)
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(hidden.dtype)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs, flattened to ids t*k + slot, sorted by expert and each expert's run
    padded to a multiple of block_m: (sorted_ids [T*k + E*(block_m-1)], padding = T*k;
    tile_expert [that / block_m], -1 past the last used tile). Sizes are the worst case, so they
    depend on the shapes only."""
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    capacity = pairs + num_experts * (block_m - 1)
    capacity = -(-capacity // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    padded_starts = padded_ends - padded
    starts = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    rank = torch.arange(pairs, device=flat.device) - starts[expert_sorted]
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, padded_starts[expert_sorted] + rank, order.to(torch.int32))
    tile_start = torch.arange(0, capacity, block_m, device=flat.device)
    tile_expert = torch.searchsorted(padded_ends, tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return sorted_ids, tile_expert


def _check(hidden, w13, w2, topk_ids) -> None:
    experts, two_inter, dim = w13.shape
    if two_inter % 2 or w2.shape != (experts, dim, two_inter // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not pair: expected w13 [E, 2I, D], w2 [E, D, I]")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden has {hidden.shape[-1]} features, the experts take {dim}")
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows for {hidden.shape[0]} tokens")


def _use_grouped_mm(hidden: torch.Tensor, w13: torch.Tensor) -> bool:
    return (
        hidden.is_cuda
        and hidden.dtype == torch.bfloat16
        and w13.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(hidden.device) == (9, 0)
    )


def _combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tokens, k = topk_weights.shape
    return (expert_out.view(tokens, k, -1).float() * topk_weights[..., None].float()).sum(1).to(dtype)


def fused_moe_grouped_mm(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """bf16 on Hopper through torch._grouped_mm: pairs sorted by expert, group ends as `offs`."""
    tokens, k = topk_ids.shape
    experts, two_inter, _ = w13.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    x = hidden[order // k]
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
    act = F.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2 :]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    out = torch.empty_like(y)
    out[order] = y
    return _combine(out, topk_weights, hidden.dtype)


def fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None, block_m: int = 16) -> torch.Tensor:
    """The Triton grouped GEMMs (fp8_block.grouped_gemm), bf16 or fp8 block-scaled weights."""
    tokens, k = topk_ids.shape
    experts, two_inter, _ = w13.shape
    sorted_ids, tile_expert = align_by_expert(topk_ids, experts, block_m)
    pairs = tokens * k
    tiles = dict(sorted_ids=sorted_ids, tile_expert=tile_expert, block_m=block_m, out_dtype=hidden.dtype)
    fp8 = w13.dtype == FP8
    if fp8:
        xq, xs = act_quant(hidden.contiguous())
        h = grouped_gemm(xq, w13, pairs, a_scale=xs, b_scale=w13_scale, a_row_div=k, **tiles)
    else:
        h = grouped_gemm(hidden.contiguous().to(w13.dtype), w13, pairs, a_row_div=k, **tiles)
    act = F.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2 :]
    if fp8:
        aq, as_ = act_quant(act.contiguous())
        y = grouped_gemm(aq, w2, pairs, a_scale=as_, b_scale=w2_scale, **tiles)
    else:
        y = grouped_gemm(act.contiguous(), w2, pairs, **tiles)
    return _combine(y, topk_weights, hidden.dtype)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """[T, D]: the routed experts' weighted sum per token. fp8 weights (e4m3) need their block
    scales w13_scale [E, 2I/128, D/128] and w2_scale [E, D/128, I/128]. `impl` forces
    "grouped_mm" or "triton" (the benchmark compares them); by default grouped_mm where it runs."""
    _check(hidden, w13, w2, topk_ids)
    if w13.dtype == FP8:
        if w13_scale is None or w2_scale is None:
            raise ValueError("fp8 expert weights need w13_scale and w2_scale (the checkpoint's weight_scale_inv)")
        check_block_scales(w13, w13_scale)
        check_block_scales(w2, w2_scale)
        return fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    if hidden.shape[0] == 0:
        return torch.zeros_like(hidden)
    if impl == "grouped_mm" or (impl is None and _use_grouped_mm(hidden, w13)):
        return fused_moe_grouped_mm(hidden, w13, w2, topk_weights, topk_ids)
    return fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids)
