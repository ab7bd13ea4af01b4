"""FP8 quantization as a pass over a built, loaded model, as gpt-fast's quantize.py swaps its
linears: model files call their projections, norms and activations with plain tensors and know
nothing of fp8. This module alone decides the formats that flow between modules.

`quantize_fp8(model)`:
1. swaps every `Linear` whose shape fp8 allows for an `Fp8Linear` (weights quantized once, one
   scale per output channel; activations per token at run time, quant.py);
2. installs the fp8 handoffs between fused kernels (fused.py): a quantized projection whose every
   reader can finish an fp8 product (a norm, SiLU-and-multiply, the rotary embedding) hands it the
   `UnscaledProduct`, and a norm or SiLU-and-multiply whose every reader is a quantized projection
   hands it `QuantizedRows`. Those readers and writers become the fp8 variants below, the only
   modules that take or give those formats. The handoffs took the separate quantize and scale
   kernels out of an fp8 decode step on the H200 (BENCHMARKS.md, 2026-11-28, second session:
   fp8 decode at 3.73 ms/token for the 8B shape).

Who reads whose output is not declared anywhere: the pass traces it, in one forward pass of two
tokens through a twin of the model on the meta device (no memory, no kernels). An output read by
anything but another module's call (the model's own arithmetic, a view, the model's result) stays
a tensor, so a new architecture is quantized correctly without knowing of this module; where the
trace cannot run (say, data-dependent code the meta device cannot evaluate), the projections
still get fp8 weights, without handoffs, and the log says so. The trace of a 70B shape (80 layers)
took 2.2 s on two busy CPU cores, next to minutes of loading its weights.

Every `Linear` becomes an `Fp8Linear`: its subclasses may differ in how they load, not in forward.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from inferd.layers.activation import SiluAndMul, silu_and_mul_kernel
from inferd.layers.context import AttentionContext, get_context, set_context
from inferd.layers.fp8_block import fp8_block_linear, quantize_weight_blocks
from inferd.layers.fused import add_rms_norm, rms_norm
from inferd.layers.fused_moe import fused_moe
from inferd.layers.linear import Linear
from inferd.layers.norm import RMSNorm
from inferd.layers.quant import QuantizedRows, can_quantize, fp8_linear, quantize_weight, unpack
from inferd.layers.rotary import RotaryEmbedding

log = logging.getLogger("inferd.quantize")


# ---- the fp8 modules ----------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """A linear layer with fp8 weights. Reads tensors or `QuantizedRows`; with `hands_product`
    returns, at decode sizes, the `UnscaledProduct` for its readers to finish."""

    def __init__(self, linear: Linear, hands_product: bool = False):
        super().__init__()
        q, scale = quantize_weight(linear.weight.data)
        self.out_dtype = linear.weight.dtype
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        # A parameter of its own: the loaded one's `weight_loader` would keep the old layer alive.
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.data, requires_grad=False)
        self.hands_product = hands_product

    def forward(self, x):
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.out_dtype, self.hands_product)


# The variants below add no state but a flag: a loaded module becomes one by taking its class, and
# keeps its parameters and buffers. Each reads an `UnscaledProduct` where the plain module reads
# its input; `hands_rows`: its output leaves as `QuantizedRows`.
def _rows(out, quantized: bool):
    return QuantizedRows(*out) if quantized else out


class Fp8RMSNorm(RMSNorm):
    hands_rows = False

    def forward(self, x, residual: torch.Tensor | None = None):
        if residual is None:
            return _rows(rms_norm(*unpack(x), self.weight, self.eps, self.hands_rows), self.hands_rows)
        out, residual = add_rms_norm(*unpack(x), residual, self.weight, self.eps, self.hands_rows)
        return _rows(out, self.hands_rows), residual


class Fp8SiluAndMul(SiluAndMul):
    hands_rows = False

    def forward(self, x):
        return _rows(silu_and_mul_kernel(*unpack(x), self.hands_rows), self.hands_rows)


class Fp8RotaryEmbedding(RotaryEmbedding):
    def forward(self, positions: torch.Tensor, qkv, q_size: int, kv_size: int):
        return self.rotate(positions, *unpack(qkv), q_size, kv_size)


FP8_VARIANTS: dict[type, type] = {RMSNorm: Fp8RMSNorm, SiluAndMul: Fp8SiluAndMul, RotaryEmbedding: Fp8RotaryEmbedding}
# Modules whose kernel can finish a product, by the argument that may carry it.
PRODUCT_READERS: dict[type, str] = {RMSNorm: "x", SiluAndMul: "x", RotaryEmbedding: "qkv"}
# Modules whose kernel can quantize its output rows.
ROW_WRITERS: set[type] = {RMSNorm, SiluAndMul}


# ---- the trace ----------------------------------------------------------------------------------
def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _Reads(TorchFunctionMode):
    """During one forward pass, who reads each leaf module's (first) output: `reads[writer]` lists
    (reader module, argument name), or (None, None) for any other code."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.writer: dict[int, str] = {}
        self.kept: list[torch.Tensor] = []  # alive, so that no other tensor takes their ids
        self.reads: dict[str, list[tuple[str | None, str | None]]] = defaultdict(list)
        self.inside = 0
        self.hooks = []
        for name, m in model.named_modules():
            if next(m.children(), None) is None:
                self.hooks.append(m.register_forward_pre_hook(functools.partial(self._enter, name), with_kwargs=True))
                self.hooks.append(m.register_forward_hook(functools.partial(self._leave, name)))

    def read_by(self, value, reader: str | None = None, argument: str | None = None) -> None:
        for t in _tensors(value):
            writer = self.writer.get(id(t))
            if writer is not None:
                self.reads[writer].append((reader, argument))

    def _enter(self, name, module, args, kwargs):
        if not self.inside:
            for argument, value in inspect.signature(module.forward).bind(*args, **kwargs).arguments.items():
                self.read_by(value, name, argument)
        self.inside += 1

    def _leave(self, name, module, args, output):
        self.inside -= 1
        first = output[0] if isinstance(output, tuple) else output
        if not self.inside and isinstance(first, torch.Tensor):
            self.writer[id(first)] = name
            self.kept.append(first)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Code between modules reads an output, except for its metadata (shape, dtype: `__get__`).
        if not self.inside and getattr(func, "__name__", "") != "__get__":
            self.read_by((args, kwargs))
        return func(*args, **kwargs)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of the model whose tensors all live on the meta device: no memory, no kernels."""
    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        memo[id(t)] = nn.Parameter(t.to("meta"), requires_grad=False) if isinstance(t, nn.Parameter) else t.to("meta")
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and id(v) not in memo:
                memo[id(v)] = v.to("meta")
    return copy.deepcopy(model, memo)


def trace_reads(model: nn.Module) -> dict[str, list[tuple[str | None, str | None]]]:
    """Who reads each leaf module's output in a prefill of two tokens (`model(input_ids,
    positions)`, the engine's call), traced on the model's meta twin."""
    twin = meta_twin(model)
    ids = torch.zeros(2, dtype=torch.long, device="meta")
    saved = get_context()
    set_context(AttentionContext(is_prefill=True, query_lens=[2], context_lens_list=[2]))
    reads = _Reads(twin)
    try:
        with torch.no_grad(), reads:
            out = twin(ids, torch.arange(2, device="meta"))
        reads.read_by(out)  # the model's result
    finally:
        reads.remove()
        set_context(saved)
    return dict(reads.reads)


# ---- the pass -----------------------------------------------------------------------------------
@dataclass
class Fp8Plan:
    """What `quantize_fp8` did, by module name."""

    fp8: list[str] = field(default_factory=list)  # linear layers with fp8 weights
    kept: list[str] = field(default_factory=list)  # linear layers whose shape fp8 does not allow
    hands_product: list[str] = field(default_factory=list)
    hands_rows: list[str] = field(default_factory=list)
    finishes_product: list[str] = field(default_factory=list)
    traced: bool = False


def plan_fp8(model: nn.Module, handoffs: bool = True) -> Fp8Plan:
    """Decide, without changing the model, which modules `quantize_fp8` makes what."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, Linear)]
    plan = Fp8Plan()
    for n in linears:
        out_features, in_features = modules[n].weight.shape
        (plan.fp8 if can_quantize(in_features, out_features) else plan.kept).append(n)
    if not handoffs or not plan.fp8:
        return plan
    try:
        reads = trace_reads(model)
    except Exception as e:  # the model's code, on the meta device: anything may fail there
        log.warning("fp8: the model could not be traced on the meta device (%s): fp8 weights without handoffs", e)
        return plan
    plan.traced = True
    fp8 = set(plan.fp8)

    def read_only_as(writer: str, accepted) -> bool:
        return bool(reads.get(writer)) and all(r is not None and accepted(modules[r], r, arg) for r, arg in reads[writer])

    def finishes(module, name, arg) -> bool:
        return PRODUCT_READERS.get(type(module)) == arg

    plan.hands_product = [n for n in plan.fp8 if read_only_as(n, finishes)]
    plan.finishes_product = sorted({r for n in plan.hands_product for r, _ in reads[n]})
    plan.hands_rows = [
        n for n, m in modules.items() if type(m) in ROW_WRITERS and read_only_as(n, lambda _, r, arg: r in fp8 and arg == "x")
    ]
    return plan


def quantize_fp8(model: nn.Module, handoffs: bool = True) -> Fp8Plan:
    """Swap the model's linear layers for fp8 ones and (with `handoffs`) install the fp8
    handoffs between fused kernels. Returns the plan it carried out."""
    plan = plan_fp8(model, handoffs)
    dtype = next((p.dtype for p in model.parameters()), None)
    hands_product = set(plan.hands_product)
    for name in plan.fp8:
        linear = model.get_submodule(name)
        _replace(model, name, Fp8Linear(linear, name in hands_product))
        # Freed now, layer by layer, not at the next garbage collection (the parameter's
        # `weight_loader` and the layer hold each other): the KV cache is sized after this.
        linear.weight = None
    for name in {*plan.finishes_product, *plan.hands_rows}:
        module = model.get_submodule(name)
        module.__class__ = FP8_VARIANTS[type(module)]
        if name in plan.hands_rows:
            module.hands_rows = True
    log.info(
        "fp8 weights: %d of %d linear layers (%d kept in %s: shape not divisible by 16); handoffs: %d products, %d row writers",
        len(plan.fp8),
        len(plan.fp8) + len(plan.kept),
        len(plan.kept),
        str(dtype).removeprefix("torch."),
        len(plan.hands_product),
        len(plan.hands_rows),
    )
    return plan


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ---- fp8 128x128 blocks (DeepSeek-V3/R1 checkpoints) on the GPU ------------------------------------
class Fp8BlockLinear(nn.Module):
    """A linear layer computed as fp8 with 128x128 weight blocks (layers/fp8_block.py)."""

    def __init__(self, linear: Linear):
        super().__init__()
        weight, scale = quantize_weight_blocks(linear.weight.data)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_block_linear(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias


class Fp8BlockExperts(nn.Module):
    """Stacked routed experts (w13 [E, 2I, D], w2 [E, D, I]) as e4m3 blocks with their scales,
    called as the model's experts module is: (x, topk_weights, topk_ids) -> [T, D]."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        for attr in ("w13", "w2"):
            pairs = [quantize_weight_blocks(w) for w in getattr(experts, attr).data]
            setattr(self, attr, nn.Parameter(torch.stack([q for q, _ in pairs]), requires_grad=False))
            self.register_buffer(f"{attr}_scale", torch.stack([scale for _, scale in pairs]))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, self.w13_scale, self.w2_scale)


def quantize_fp8_blocks(model: nn.Module) -> int:
    """The CUDA form of an fp8 block checkpoint: the loader dequantized its blocks (the CPU path),
    and every `Linear` and stacked experts module (one with `w13` and `w2`) goes back to e4m3
    blocks with their scales, which give the checkpoint's own values again (each block's largest
    value was quantized to 448). Returns the number of weights swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear):
            _replace(model, name, Fp8BlockLinear(module))
            module.weight = None
            swapped += 1
        elif isinstance(getattr(module, "w13", None), nn.Parameter) and isinstance(getattr(module, "w2", None), nn.Parameter):
            _replace(model, name, Fp8BlockExperts(module))
            module.w13 = module.w2 = None
            swapped += 2
    log.info("fp8 128x128 block weights on the GPU: %d weights", swapped)
    return swapped
