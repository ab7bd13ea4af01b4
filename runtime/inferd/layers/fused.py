"""Elementwise pieces of a decoder layer (RMSNorm with the residual add, rotary embedding,
SiLU-and-multiply), written once in plain PyTorch. On CUDA each is compiled by torch.compile
into one fused kernel: a decode step then launches a few kernels per layer instead of dozens,
which is most of the gap between eager decode and the weight-bandwidth roofline. On the CPU the
same functions run eagerly, so the reference path and the fast path are one piece of code."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def cuda_compiled(fn):
    """torch.compile on CUDA, eager on the CPU. Sizes stay symbolic: no "duck sizing" (a batch of
    4096 tokens must not be specialised as equal to a hidden size of 4096), and room for the few
    real specialisations (size 1, bias or none) before dynamo would fall back to eager code."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args)
        if compiled is None:
            torch.fx.experimental._config.use_duck_shape = False
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(*args)

    return wrapper


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@cuda_compiled
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms(x, weight, eps)


@cuda_compiled
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual
    return _rms(x, weight, eps), x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@cuda_compiled
def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, head_dim: int):
    cos, sin = cos_sin[:, positions].to(q.dtype).unsqueeze(2)  # [T, 1, D]
    q = q.view(q.shape[0], -1, head_dim)
    k = k.view(k.shape[0], -1, head_dim)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q.flatten(1), k.flatten(1)


@cuda_compiled
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
