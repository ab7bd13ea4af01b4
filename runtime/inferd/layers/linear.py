"""Linear layers whose parameters load themselves from checkpoint tensors (`weight_loader`),
including fused projections (q/k/v into qkv_proj, gate/up into gate_up_proj). Tensor-parallel
sharding slots in here: a sharded layer narrows the loaded tensor before the copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.fused import QuantizedRows
from inferd.layers.quant import FP8, can_quantize, fp8_linear, quantize_weight


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """`fp8_handoff`: the model's neighbouring kernels do this layer's fp8 elementwise work (see
    fused.py): the previous one hands it quantized rows, the next one applies the scales to the
    product it returns unscaled (`UnscaledProduct`, at decode sizes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, fp8_handoff: bool = False):
        super().__init__()
        self.fp8_handoff = fp8_handoff
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def quantize_fp8(self) -> bool:
        """Replace the loaded weight by fp8 values and per-channel scales. False where the shape
        does not allow it (the layer then stays in the model's dtype)."""
        out_features, in_features = self.weight.shape
        if not can_quantize(in_features, out_features):
            return False
        q, scale = quantize_weight(self.weight.data)
        self.out_dtype = self.weight.dtype
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        return True

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8

    @property
    def wants_fp8_rows(self) -> bool:
        return self.is_fp8 and self.fp8_handoff

    def forward(self, x):
        if self.is_fp8:
            return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.out_dtype, self.fp8_handoff)
        if isinstance(x, QuantizedRows):
            raise TypeError("fp8 rows were handed to a layer without fp8 weights: ask for quant only where is_fp8")
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        shard_names: list | None = None,
        fp8_handoff: bool = False,
    ):
        super().__init__(in_features, sum(output_sizes), bias, fp8_handoff)
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
    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, fp8_handoff: bool = False
    ):
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, ["q", "k", "v"], fp8_handoff)
