"""Linear layers whose parameters load themselves from checkpoint tensors (`weight_loader`),
including fused projections (q/k/v into qkv_proj, gate/up into gate_up_proj). Tensor-parallel
sharding slots in here: a sharded layer narrows the loaded tensor before the copy. With fp8, the
quantization pass (quantize.py) swaps them for `Fp8Linear`s once they are loaded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        shard_names: list | None = None,
    ):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = output_sizes
        self.shard_names = shard_names or list(range(len(output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        idx = self.shard_names.index(shard_id)
        offset = sum(self.output_sizes[:idx])
        default_weight_loader(param.data.narrow(0, offset, self.output_sizes[idx]), loaded)


class QKVLinear(MergedLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, ["q", "k", "v"])
