"""Rotary embedding of Multi-head Latent Attention's rope parts (DeepSeek-V2/V3): the queries'
and the shared key's in one call, which torch.compile makes one kernel on CUDA (eager on the CPU,
the same arithmetic). Eager, the two rotations were ~20 small kernels a layer (gathers, casts,
four products, a stack each): at batch 1 a V2-Lite decode step replays ~1,800 kernels in its
CUDA graph at ~3.5 us each (6.30 ms a step, 16 % of its roofline, BENCHMARKS.md), so each kernel
removed from every layer is a step's ~0.1 ms.

DeepSeek's checkpoints pair dimensions (0,1), (2,3), ... (`interleave`); the result keeps that
layout. Queries and keys only meet in dot products, so any layout used for both gives the same
scores."""

from __future__ import annotations

import torch

from inferd.layers.fused import cuda_compiled


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
    cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@cuda_compiled
def rotate_query_and_key(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, d] and k [T, d] rotated by the angles of `positions` (cos, sin [max_position, d/2])."""
    cos, sin = cos[positions], sin[positions]
    return _rotate(q, cos, sin, interleave), _rotate(k, cos, sin, interleave)
