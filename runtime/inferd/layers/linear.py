"""Linear layers whose parameters load themselves from checkpoint tensors (`weight_loader`),
including fused projections (q/k/v into qkv_proj, gate/up into gate_up_proj). With fp8, the
quantization pass (quantize.py) swaps them for `Fp8Linear`s once they are loaded.

Tensor parallelism (Megatron's split, as in nano-vllm): `parallel="column"` keeps this rank's
slice of the output features (qkv, gate_up), `parallel="row"` its slice of the input features
(o_proj, down_proj), whose partial sums the model adds up with one all-reduce (`AllReduce`). Each
rank narrows the checkpoint tensor to its slice as it loads it. The default (None) is a layer
every rank holds whole, so a model that does not ask for sharding is correct at any size. Forward
is the same plain `F.linear` for all of them: the fp8 pass quantizes each rank's slice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.distributed import divide, tp_rank, tp_size


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


PARALLEL_KINDS = (None, "column", "row")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: str | None = None):
        super().__init__()
        if parallel not in PARALLEL_KINDS:
            raise ValueError(f"parallel must be one of {PARALLEL_KINDS}, got {parallel!r}")
        self.parallel = parallel
        if parallel == "column":
            out_features = divide(out_features, "output features")
        elif parallel == "row":
            in_features = divide(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, self.shard(param, loaded))

    def shard(self, param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a whole checkpoint tensor."""
        if self.parallel == "column":
            return _narrow(loaded, 0, param.shape[0])
        if self.parallel == "row":
            if loaded.dim() == 1:
                # The bias is added once, after the sum over ranks would add it `tp_size` times.
                return loaded if tp_rank() == 0 else torch.zeros_like(loaded)
            return _narrow(loaded, 1, param.shape[1])
        return loaded

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
        parallel: str | None = None,
    ):
        if parallel == "row":
            raise ValueError("a merged projection splits its output: parallel must be 'column' or None")
        super().__init__(in_features, sum(output_sizes), bias, parallel)
        if parallel == "column":
            output_sizes = [divide(n, "a merged projection's part") for n in output_sizes]
        self.output_sizes = output_sizes
        self.shard_names = shard_names or list(range(len(output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            if self.parallel == "column" and tp_size() > 1:
                raise ValueError("an already fused tensor cannot be split by rank: load its parts (q/k/v, gate/up)")
            default_weight_loader(param, loaded)
            return
        idx = self.shard_names.index(shard_id)
        offset, size = sum(self.output_sizes[:idx]), self.output_sizes[idx]
        if self.parallel == "column":
            loaded = _narrow(loaded, 0, size)
        default_weight_loader(param.data.narrow(0, offset, size), loaded)


class QKVLinear(MergedLinear):
    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        parallel: str | None = None,
    ):
        # Column-parallel by whole heads: the per-part split below then falls on head boundaries.
        if parallel == "column":
            divide(num_heads, "num_attention_heads")
            divide(num_kv_heads, "num_key_value_heads")
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, ["q", "k", "v"], parallel)


def _narrow(loaded: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Rank r's `size` entries of `dim`; a tensor of the wrong size is left for the shape check."""
    if tp_size() == 1 or loaded.shape[dim] != size * tp_size():
        return loaded
    return loaded.narrow(dim, tp_rank() * size, size)
