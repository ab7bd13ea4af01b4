from __future__ import annotations

import torch
from torch import nn

from inferd.layers.fused import silu_and_mul


def silu_and_mul_kernel(x, x_scale, weight_scale, bias, quant: str | None):
    """`fused.silu_and_mul`, as the Triton kernel on CUDA."""
    if x.is_cuda:
        from inferd.layers.triton_fused import silu_and_mul_triton

        return silu_and_mul_triton(x, x_scale, weight_scale, bias, quant)
    return silu_and_mul(x, x_scale, weight_scale, bias, quant)


class SiluAndMul(nn.Module):
    """silu(gate) * up on the fused gate_up projection's output (a Triton kernel on CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_kernel(x, None, None, None, None)
