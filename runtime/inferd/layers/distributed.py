"""The tensor-parallel process group this process belongs to. Layers read `tp_rank()`/`tp_size()`
when they are built (0/1 until `init_tensor_parallel` is called, so single-GPU code and models that
know nothing of tensor parallelism run unchanged) and call the collectives below in forward.

One process per GPU, as in nano-vllm and vLLM: rank 0 runs the scheduler, every rank runs the same
model step on its shard. NCCL on CUDA (its collectives can be captured in CUDA graphs), gloo on the
CPU (the tests)."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

_rank = 0
_size = 1


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _size


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the group. `timeout_s` bounds a collective waiting for a rank that will never come (a
    dead worker), so a failure ends in an error instead of a hang."""
    global _rank, _size
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s), **kwargs
    )
    _rank, _size = rank, size


def check_no_group() -> None:
    """One group per process: a second engine's would need the first's ranks."""
    if dist.is_initialized():
        raise RuntimeError(
            "a tensor-parallel engine is already running in this process: close it (LLMEngine.close()) "
            "before starting another (with tensor_parallel_size > 1 a model swap unloads the old model first)"
        )


def destroy_tensor_parallel(abort: bool = False) -> None:
    """Leave the group. `abort`: a peer died, so NCCL's orderly teardown (which flushes the
    collectives in flight, and those wait for the dead rank) is skipped for an abort."""
    global _rank, _size
    if dist.is_initialized():
        try:
            if abort and dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:  # a group whose peer died may fail to tear down; the process is leaving it anyway
            pass
    _rank, _size = 0, 1


def divide(n: int, what: str) -> int:
    if n % _size:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({_size})")
    return n // _size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum the partial results of a row-parallel layer (in place); the identity on one rank."""
    if _size > 1 and not x.is_meta:  # the fp8 pass traces the model on the meta device
        dist.all_reduce(x)
    return x


class AllReduce(nn.Module):
    """`all_reduce` as a module, after a row-parallel projection. A module call, not a function
    call, so that the fp8 pass's trace sees who reads the projection's output and leaves it a
    plain tensor (an fp8 product cannot be summed over ranks). Only models built with more than
    one rank have one: on one rank the projection keeps its fp8 handoff."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(x)


def make_all_reduce() -> AllReduce | None:
    return AllReduce() if _size > 1 else None


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Every rank's slice of the last dimension, concatenated in rank order (the logits of a
    vocabulary-parallel head). All ranks get the result so that the CUDA graph each rank captures
    holds the same collectives; only rank 0 samples from it."""
    if _size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((_size, *x.shape), dtype=x.dtype, device=x.device)
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(out, x)
    else:
        dist.all_gather(list(out.unbind(0)), x)
    return out.movedim(0, -2).reshape(*x.shape[:-1], _size * x.shape[-1])


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    if _size > 1:
        dist.broadcast(x, src=0)
    return x


def min_over_ranks(n: int) -> int:
    """The smallest of each rank's value (KV-cache blocks: every rank's block tables are the same)."""
    if _size == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
