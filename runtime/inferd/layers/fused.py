"""Elementwise pieces of a decoder layer (RMSNorm with the residual add, rotary embedding,
SiLU-and-multiply), written once in plain PyTorch. On CUDA the norms are compiled by
torch.compile into one fused kernel each, and the rotary embedding and SiLU-and-multiply run as
the Triton kernels in triton_fused.py (torch.compile's were slow at decode sizes): a decode step
then launches a few kernels per layer instead of dozens, which is most of the gap between eager
decode and the weight-bandwidth roofline. On the CPU the same functions run eagerly: the
reference the fast path is tested against."""

from __future__ import annotations

import functools
from typing import NamedTuple

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
        if not next(a for a in args if isinstance(a, torch.Tensor)).is_cuda:
            return fn(*args)
        if compiled is None:
            torch.fx.experimental._config.use_duck_shape = False
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # No split reductions: with few rows Inductor would split a 14,336-wide row's amax
            # over several kernels (SiLU-and-multiply with fp8 output: four kernels, 15 us a
            # layer at 64 decode rows) where one pass per row does it.
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"split_reductions": False})
        return compiled(*args)

    return wrapper


# ---- quantized handoffs between kernels ---------------------------------------------------------
# With fp8 or int8 (W8A8) weights a linear layer needs its input quantized per token, and an fp8
# product still needs the token and channel scales (and the bias). Both are elementwise passes
# over the activations, so they can be done inside the neighbouring kernels below: each takes a
# product as the flat (x, x_scale, weight_scale, bias) (x_scale None: x is a plain tensor) and,
# with `quant` ("fp8" or "int8"), hands the next layer quantized rows. Which kernel does which is
# decided in one place, the quantization pass (quantize.py).
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# int8 codes are symmetric, [-127, 127] (int8.py says why -128 is left out).
INT8_MAX = 127
# Each row format: its element type and the largest magnitude a scaled row is mapped to.
ROW_FORMATS = {"fp8": (FP8, FP8_MAX), "int8": (torch.int8, INT8_MAX)}


class QuantizedRows(NamedTuple):
    """Activations quantized per token (fp8 or int8): q (M, K) and float32 scales (M, 1)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The activations' shape: model code may read it (the passes' trace lets a module hand
        quantized rows on where other code reads only its output's metadata)."""
        return self.q.shape


def finish(x: torch.Tensor, x_scale, weight_scale, bias) -> torch.Tensor:
    """The layer output itself: scales and bias applied in float32, rounded to the product's dtype."""
    if x_scale is None:
        return x
    out = x.float() * x_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quantize(x: torch.Tensor, fmt: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> (M, K) in `fmt` and float32 scales (M, 1), one per token: fp8 e4m3
    (the cast rounds), or int8 rounded half to even (as Triton kernels' `rint` does)."""
    dtype, top = ROW_FORMATS[fmt]
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / top
    scaled = xf / scale
    if fmt == "int8":
        scaled = torch.round(scaled)
    return scaled.clamp(-top, top).to(dtype), scale


def _output(h: torch.Tensor, quant: str | None):
    return quantize(h, quant) if quant else h


# ---- decoder-layer kernels ----------------------------------------------------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@cuda_compiled
def rms_norm(x, x_scale, weight_scale, bias, weight: torch.Tensor, eps: float, quant: str | None = None):
    return _output(_rms(finish(x, x_scale, weight_scale, bias), weight, eps), quant)


@cuda_compiled
def add_rms_norm(
    x, x_scale, weight_scale, bias, residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: str | None = None
):
    x = finish(x, x_scale, weight_scale, bias) + residual
    return _output(_rms(x, weight, eps), quant), x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qkv_rotary(
    positions: torch.Tensor, x, x_scale, weight_scale, bias, cos_sin: torch.Tensor, head_dim: int, q_size: int, kv_size: int
):
    """Split the fused q/k/v projection and rotate q and k (the reference; CUDA runs the same
    arithmetic as one Triton kernel, triton_fused.py)."""
    q, k, v = finish(x, x_scale, weight_scale, bias).split([q_size, kv_size, kv_size], dim=-1)
    cos, sin = cos_sin[:, positions].to(q.dtype).unsqueeze(2)  # [T, 1, D]
    q = q.reshape(q.shape[0], -1, head_dim)
    k = k.reshape(k.shape[0], -1, head_dim)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q.flatten(1), k.flatten(1), v.contiguous()


def silu_and_mul(x, x_scale=None, weight_scale=None, bias=None, quant: str | None = None):
    """silu(gate) * up from the fused gate/up product, optionally as quantized rows (the
    reference; CUDA runs triton_fused.silu_and_mul_triton)."""
    gate, up = finish(x, x_scale, weight_scale, bias).chunk(2, dim=-1)
    return _output(F.silu(gate) * up, quant)
