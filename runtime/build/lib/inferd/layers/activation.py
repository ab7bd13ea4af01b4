from __future__ import annotations

import torch
from torch import nn

from inferd.layers.fused import silu_and_mul


class SiluAndMul(nn.Module):
    """silu(gate) * up on the fused gate_up projection's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
