"""The batch-1 GEMV pass (CUDA, bf16/fp16 weights): like the fp8 pass (quantize.py) it rewrites a
built, loaded model so the model files stay plain. It traces who reads whose output
(`quantize.trace_reads`) and then

1. makes every `Linear` a GEMV linear: one row (a decode step at batch 1) goes through
   `gemv.gemv`, more rows through F.linear as before;
2. defers an RMSNorm whose every reader is a GEMV linear: on one row it returns the
   `PendingNorm` (its input, residual and weight) and its readers do the norm in their prologue;
3. gives a merged gate/up projection read only by SiLU-and-multiply the `silu` epilogue: on one
   row it returns the `ActivatedProduct`, which SiLU-and-multiply passes on as it is;
4. makes the LM head take rows computed as one (a verify pass) one at a time (`RowwiseLMHead`).

Each module decides by its own input (one row on CUDA, the model's dtype), so a deferred norm is
only ever read by a module that finishes it; a reader that cannot (an odd shape) finishes it with
the plain kernels (`materialize`). Modules keep their classes' loaders (an in-place weight swap
loads through them): a variant is a subclass made per class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from inferd.layers.activation import SiluAndMul
from inferd.layers.context import get_context
from inferd.layers.embed_head import LMHead
from inferd.layers.fused import add_rms_norm, rms_norm
from inferd.layers.linear import Linear, MergedLinear
from inferd.layers.norm import RMSNorm

log = logging.getLogger("inferd.gemv")

# The row types the GEMV kernels take (bf16/fp16 weights and activations).
GEMV_DTYPES = (torch.bfloat16, torch.float16)


class PendingNorm(NamedTuple):
    """RMSNorm(x + residual) (RMSNorm(x) without a residual) still to be computed by its reader,
    which writes x + residual to residual_out (the tensor the norm already returned)."""

    x: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor
    eps: float
    residual_out: torch.Tensor | None

    # What code between modules may ask of an output without reading it (the trace does not see it).
    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device


class ActivatedProduct(NamedTuple):
    """silu(gate) * up, computed in the gate/up projection's epilogue."""

    value: torch.Tensor


def one_row(x) -> bool:
    """Whether the GEMV kernels take x: rows of a half-precision type on CUDA with contiguous
    elements, one of them (a batch-1 step) or any number computed as one (the step context's
    `rows_as_one`: a verify pass of one sequence)."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_cuda
        and x.dim() == 2
        and (x.shape[0] == 1 or get_context().rows_as_one)
        and x.dtype in GEMV_DTYPES
        and x.stride(-1) == 1
    )


def materialize(x: PendingNorm) -> torch.Tensor:
    """The deferred norm computed by the plain kernels (a reader the GEMV cannot serve)."""
    if x.residual is None:
        return rms_norm(x.x, None, None, None, x.weight, x.eps)
    out, residual = add_rms_norm(x.x, None, None, None, x.residual, x.weight, x.eps)
    x.residual_out.copy_(residual)
    return out


class GemvLinear:
    """Mixed into a `Linear` class by the pass (`_variant`)."""

    silu_epilogue = False

    def forward(self, x):
        weight = self.weight
        pending = x if isinstance(x, PendingNorm) else None
        row = pending.x if pending is not None else x
        if not (one_row(row) and weight.dtype == row.dtype and weight.stride(-1) == 1):
            return super().forward(materialize(x) if pending is not None else x)
        from inferd.layers.gemv import gemv  # Triton: CUDA only

        norm = None if pending is None else (pending.residual, pending.weight, pending.eps, pending.residual_out)
        out = gemv(row, weight, self.bias, norm=norm, silu=self.silu_epilogue)
        return ActivatedProduct(out) if self.silu_epilogue else out


class RowwiseLMHead(LMHead):
    """Rows computed as one (a verify pass) go through the LM head one at a time, as the batch-1
    step's single row does (cuBLAS rounds differently at one row and at several). The head stays
    cuBLAS's: the GEMV kernel measured slower on it (BENCHMARKS.md)."""

    def forward(self, hidden):
        if not (get_context().rows_as_one and hidden.dim() == 2 and hidden.shape[0] > 1):
            return super().forward(hidden)
        return torch.cat([LMHead.forward(self, row) for row in hidden.split(1)])


class DeferredRMSNorm(RMSNorm):
    def forward(self, x, residual: torch.Tensor | None = None):
        if not one_row(x) or (residual is not None and not (one_row(residual) and residual.is_contiguous())):
            return super().forward(x, residual)
        if residual is None:
            return PendingNorm(x, None, self.weight, self.eps, None)
        residual_out = torch.empty_like(x)
        return PendingNorm(x, residual, self.weight, self.eps, residual_out), residual_out


class ActivatedSiluAndMul(SiluAndMul):
    def forward(self, x):
        return x.value if isinstance(x, ActivatedProduct) else super().forward(x)


_VARIANTS: dict[type, type] = {}


def _variant(cls: type) -> type:
    """`cls` with the GEMV forward: a subclass, so the class's own weight loader stays."""
    if cls not in _VARIANTS:
        _VARIANTS[cls] = type(f"Gemv{cls.__name__}", (GemvLinear, cls), {})
    return _VARIANTS[cls]


@dataclass
class GemvPlan:
    """What `fuse_gemv` did, by module name."""

    linears: list[str] = field(default_factory=list)
    deferred_norms: list[str] = field(default_factory=list)
    silu_epilogues: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    traced: bool = False


def plan_gemv(model: nn.Module) -> GemvPlan:
    from inferd.layers.quantize import read_only_as, trace_reads  # the fp8 pass's tracer

    modules = dict(model.named_modules())
    plan = GemvPlan(
        linears=[
            n for n, m in modules.items() if isinstance(m, Linear) and type(m).forward is Linear.forward and m.weight is not None
        ],
        heads=[n for n, m in modules.items() if type(m) is LMHead],
    )
    if not plan.linears:
        return plan
    try:
        reads = trace_reads(model)
    except Exception as e:  # the model's code on the meta device: anything may fail there
        log.warning("gemv: the model could not be traced on the meta device (%s): GEMV linears without fused norms", e)
        return plan
    plan.traced = True
    gemv_linears = set(plan.linears)
    plan.deferred_norms = [
        n
        for n, m in modules.items()
        if type(m) is RMSNorm and read_only_as(reads, n, lambda r, arg: r in gemv_linears and arg == "x")
    ]
    plan.silu_epilogues = [
        n
        for n in plan.linears
        if isinstance(modules[n], MergedLinear)
        and len(set(modules[n].output_sizes)) == 1
        and len(modules[n].output_sizes) == 2
        and read_only_as(reads, n, lambda r, arg: type(modules[r]) is SiluAndMul and arg == "x")
    ]
    return plan


def fuse_gemv(model: nn.Module) -> GemvPlan:
    """Install the batch-1 GEMV path on a loaded model (see the module's docstring)."""
    plan = plan_gemv(model)
    epilogues = set(plan.silu_epilogues)
    for name in plan.linears:
        module = model.get_submodule(name)
        module.__class__ = _variant(type(module))
        module.silu_epilogue = name in epilogues
    for name in plan.deferred_norms:
        model.get_submodule(name).__class__ = DeferredRMSNorm
    for name in plan.heads:
        model.get_submodule(name).__class__ = RowwiseLMHead
    for module in model.modules():
        if type(module) is SiluAndMul:
            module.__class__ = ActivatedSiluAndMul
    log.info(
        "batch-1 GEMV: %d linear layers, %d norms in their prologues, %d SiLU epilogues, %d LM heads",
        len(plan.linears),
        len(plan.deferred_norms),
        len(plan.silu_epilogues),
        len(plan.heads),
    )
    return plan
