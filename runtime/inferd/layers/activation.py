from __future__ import annotations

from torch import nn

from inferd.layers.fused import QuantizedRows, silu_and_mul, unpack


class SiluAndMul(nn.Module):
    """silu(gate) * up on the fused gate_up projection's output (a Triton kernel on CUDA)."""

    def forward(self, x, quant: bool = False):
        args = (*unpack(x), quant)
        if args[0].is_cuda:
            from inferd.layers.triton_fused import silu_and_mul_triton

            out = silu_and_mul_triton(*args)
        else:
            out = silu_and_mul(*args)
        return QuantizedRows(*out) if quant else out
