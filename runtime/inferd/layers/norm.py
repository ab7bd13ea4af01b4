from __future__ import annotations

import torch
from torch import nn

from inferd.layers.fused import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With a residual: returns (norm(x + residual), x + residual), the pre-norm block's pair."""
        if residual is None:
            return rms_norm(x, None, None, None, self.weight, self.eps)
        return add_rms_norm(x, None, None, None, residual, self.weight, self.eps)
