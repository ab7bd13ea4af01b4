from __future__ import annotations

from torch import nn

from inferd.layers.fused import QuantizedRows, silu_and_mul, unpack


class SiluAndMul(nn.Module):
    """silu(gate) * up on the fused gate_up projection's output."""

    def forward(self, x, quant: bool = False):
        out = silu_and_mul(*unpack(x), quant)
        return QuantizedRows(*out) if quant else out
