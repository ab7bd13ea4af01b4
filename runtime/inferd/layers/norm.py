from __future__ import annotations

import torch
from torch import nn

from inferd.layers.fused import QuantizedRows, add_rms_norm, rms_norm, unpack


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x, residual: torch.Tensor | None = None, quant: bool = False):
        """With a residual: returns (norm(x + residual), x + residual), the pre-norm block's pair.
        x may be an fp8 layer's unscaled product; with `quant` the normed rows come out as fp8
        `QuantizedRows` for the next layer."""
        if residual is None:
            out = rms_norm(x, self.weight, self.eps, quant)
            return QuantizedRows(*out) if quant else out
        out, residual = add_rms_norm(*unpack(x), residual, self.weight, self.eps, quant)
        return (QuantizedRows(*out) if quant else out), residual
