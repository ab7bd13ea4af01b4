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

import contextlib
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
from inferd.layers.fp8_block import FP8, GROUP, fp8_block_linear, quantize_weight_blocks
from inferd.layers.fused import add_rms_norm, rms_norm
from inferd.layers.fused_moe import fused_moe
from inferd.layers.int8 import INT8_QUANTIZATIONS, Int8Linear, can_quantize_int8
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
# its input; `hands_rows` ("fp8" or "int8"): its output leaves as `QuantizedRows` of that format
# (the int8 pass uses the norm and SiLU variants for its row handoffs alone).
def _rows(out, quantized: str | None):
    return QuantizedRows(*out) if quantized else out


class Fp8RMSNorm(RMSNorm):
    hands_rows: str | None = None

    def forward(self, x, residual: torch.Tensor | None = None):
        if residual is None:
            return _rows(rms_norm(*unpack(x), self.weight, self.eps, self.hands_rows), self.hands_rows)
        out, residual = add_rms_norm(*unpack(x), residual, self.weight, self.eps, self.hands_rows)
        return _rows(out, self.hands_rows), residual


class Fp8SiluAndMul(SiluAndMul):
    hands_rows: str | None = None

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

    def finishes(reader: str, arg: str) -> bool:
        return PRODUCT_READERS.get(type(modules[reader])) == arg

    plan.hands_product = [n for n in plan.fp8 if read_only_as(reads, n, finishes)]
    plan.finishes_product = sorted({r for n in plan.hands_product for r, _ in reads[n]})
    plan.hands_rows = row_writers(modules, reads, fp8)
    return plan


def row_writers(modules: dict[str, nn.Module], reads: dict, quantized: set[str]) -> list[str]:
    """The norms and SiLU-and-multiplies whose every reader is one of the `quantized` linear
    layers (their input `x`): they can hand those layers quantized rows."""

    def takes_rows(reader: str, argument: str) -> bool:
        return reader in quantized and argument == "x"

    return [n for n, m in modules.items() if type(m) in ROW_WRITERS and read_only_as(reads, n, takes_rows)]


def read_only_as(reads: dict, writer: str, accepted) -> bool:
    """Whether `writer`'s output is read, and only by module calls that `accepted(reader, argument)`
    (of `trace_reads`' result; the passes hand a format on only where every reader takes it)."""
    return bool(reads.get(writer)) and all(r is not None and accepted(r, arg) for r, arg in reads[writer])


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
            module.hands_rows = "fp8"
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
def keeps_fp8_blocks(device: torch.device | str) -> bool:
    """Whether fp8 block weights stay e4m3 on `device`, computed by the Triton block GEMM: CUDA
    with fp8 tensor cores (Ada, Hopper: 8.9 and newer). Elsewhere the loader dequantizes them."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _block_rows(offset: int, size: int, what: str) -> tuple[int, int]:
    """The block rows of weight rows offset..offset+size (a part that is not the last one is
    a whole number of blocks: `prepare_fp8_blocks` leaves other modules in float)."""
    if offset % GROUP:
        raise ValueError(f"{what}: rows from {offset} do not start a {GROUP}-row weight block")
    return offset // GROUP, -(-size // GROUP)


def _load_blocks(weight: torch.Tensor, scale: torch.Tensor, loaded: torch.Tensor, loaded_scale, what: str) -> None:
    """Copy one checkpoint weight (e4m3 with its weight_scale_inv, or a float one, quantized to
    blocks here) into `weight` / `scale` (views of the module's, for a part of a stacked weight)."""
    if loaded.dtype != FP8:
        if loaded_scale is not None:
            raise ValueError(f"{what}: a weight_scale_inv beside a {loaded.dtype} weight")
        loaded, loaded_scale = quantize_weight_blocks(loaded.to(weight.device))
    elif loaded_scale is None:
        raise ValueError(f"{what}: an e4m3 weight without its weight_scale_inv")
    if tuple(loaded.shape) != tuple(weight.shape) or tuple(loaded_scale.shape) != tuple(scale.shape):
        raise ValueError(
            f"{what}: checkpoint weight {tuple(loaded.shape)} with scales {tuple(loaded_scale.shape)}, "
            f"the model expects {tuple(weight.shape)} with {tuple(scale.shape)}"
        )
    weight.copy_(loaded)
    scale.copy_(loaded_scale)


class Fp8BlockLinear(nn.Module):
    """A linear layer computed as fp8 with 128x128 weight blocks (layers/fp8_block.py). Built
    from a loaded `Linear` (its weight quantized to blocks), or `empty` before loading, when its
    weight loader takes the checkpoint's e4m3 weight and weight_scale_inv as they are."""

    def __init__(self, linear: Linear, empty: bool = False):
        super().__init__()
        n, k = linear.weight.shape
        if empty:
            weight = torch.empty(n, k, dtype=FP8, device=linear.weight.device)
            scale = torch.empty(-(-n // GROUP), -(-k // GROUP), dtype=torch.float32, device=linear.weight.device)
        else:
            weight, scale = quantize_weight_blocks(linear.weight.data)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias
        # (offset, size) of each part of a merged projection (gate/up), by its shard id
        sizes = getattr(linear, "output_sizes", None)
        names = getattr(linear, "shard_names", None) or []
        self.parts = {name: (sum(sizes[:i]), sizes[i]) for i, name in enumerate(names)} if sizes else {}
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None, scale=None) -> None:
        weight, scales = param.data, self.weight_scale
        if shard_id is not None:
            offset, size = self.parts[shard_id]
            first, count = _block_rows(offset, size, f"part {shard_id!r}")
            weight, scales = weight.narrow(0, offset, size), scales.narrow(0, first, count)
        _load_blocks(weight, scales, loaded, scale, "fp8 block weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_block_linear(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias


class Fp8BlockExperts(nn.Module):
    """Stacked routed experts (w13 [E, 2I, D], w2 [E, D, I]) as e4m3 blocks with their scales,
    called as the model's experts module is: (x, topk_weights, topk_ids) -> [T, D]. Built from
    loaded experts, or `empty` to take the checkpoint's per-expert e4m3 tensors and scales."""

    def __init__(self, experts: nn.Module, empty: bool = False):
        super().__init__()
        self.intermediate_size = experts.w2.shape[-1]
        for attr in ("w13", "w2"):
            source = getattr(experts, attr)
            if empty:
                e, n, k = source.shape
                weight = torch.empty(e, n, k, dtype=FP8, device=source.device)
                scale = torch.empty(e, -(-n // GROUP), -(-k // GROUP), dtype=torch.float32, device=source.device)
            else:
                pairs = [quantize_weight_blocks(w) for w in source.data]
                weight, scale = torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
            setattr(self, attr, nn.Parameter(weight, requires_grad=False))
            self.register_buffer(f"{attr}_scale", scale)
            getattr(self, attr).weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None, scale=None) -> None:
        """shard_id (expert, 'gate' | 'up' | 'down'), as the model's `checkpoint_target` names them."""
        if shard_id is None:
            raise ValueError("fp8 block experts load one expert's gate, up or down weight at a time")
        expert, which = shard_id
        weight, scales = param.data[expert], (self.w2_scale if which == "down" else self.w13_scale)[expert]
        if which != "down":
            size = self.intermediate_size
            first, count = _block_rows(0 if which == "gate" else size, size, f"expert {expert} {which}")
            weight, scales = weight.narrow(0, 0 if which == "gate" else size, size), scales.narrow(0, first, count)
        _load_blocks(weight, scales, loaded, scale, f"expert {expert} {which}")

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, self.w13_scale, self.w2_scale)


def _stacked_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "w13", None), nn.Parameter) and isinstance(getattr(module, "w2", None), nn.Parameter)


def prepare_fp8_blocks(model: nn.Module) -> nn.Module:
    """Before loading an fp8 block checkpoint where its blocks stay e4m3 (`keeps_fp8_blocks`):
    every `Linear` and stacked experts module becomes an empty fp8 block module, so the loader
    copies the checkpoint's e4m3 bytes and scales in, and no float copy of them ever exists (a
    V3/R1 in bf16 would be twice its 690 GB). Left as they are: merged projections or experts
    whose parts do not fall on 128-row blocks (their scales could not be split by part; they load
    dequantized and `quantize_fp8_blocks` makes them blocks), and modules that are not linear
    layers (MLA's kv_b_proj, read as two absorbed matrices: it loads dequantized). Returns model."""
    for name, module in list(model.named_modules()):
        twin = _empty_fp8_block_module(module)
        if twin is not None:
            _replace(model, name, twin)
    return model


def _empty_fp8_block_module(submodule: nn.Module) -> nn.Module | None:
    """The empty fp8 block twin `prepare_fp8_blocks` would put in `submodule`'s place, or None."""
    if isinstance(submodule, Linear):
        if any(size % GROUP for size in getattr(submodule, "output_sizes", ())[:-1]):
            return None
        twin = Fp8BlockLinear(submodule, empty=True)
        submodule.weight = None
        return twin
    if _stacked_experts(submodule) and not isinstance(submodule, Fp8BlockExperts):
        if submodule.w2.shape[-1] % GROUP:
            return None
        twin = Fp8BlockExperts(submodule, empty=True)
        submodule.w13 = submodule.w2 = None
        return twin
    return None


@contextlib.contextmanager
def fp8_blocks_as_built(block_size: tuple[int, int] | None, device: torch.device):
    """While a model of an fp8 block checkpoint (`block_size` [128, 128]) is built for a device
    that keeps its blocks (`keeps_fp8_blocks`): each linear layer and stacked experts module is
    replaced, as it is attached to its parent, by its empty fp8 block twin, so the float weights
    of one module at a time exist, never the model's (V3/R1 in bf16, 1.3 TB, fits no host or
    GPU), and the model file knows nothing of it. Elsewhere, nothing happens."""
    if tuple(block_size or ()) != (GROUP, GROUP) or not keeps_fp8_blocks(device):
        yield
        return

    def replace(parent, name, submodule):
        return _empty_fp8_block_module(submodule)

    handle = torch.nn.modules.module.register_module_module_registration_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def quantize_fp8_blocks(model: nn.Module, linears: bool = True) -> int:
    """The CUDA form of an fp8 block checkpoint for what the loader left in float (all of it when
    the model was not prepared with `prepare_fp8_blocks`): every `Linear` and stacked experts
    module goes to e4m3 blocks with their scales, which give the checkpoint's own values again
    (each block's largest value was quantized to 448). Without `linears`, the experts only: after
    `quantize_fp8` (`quantization: fp8` on a bf16 MoE checkpoint), whose per-channel fp8 covers
    linear layers, not the stacked experts that hold most of a MoE model's weights. Returns the
    number of weights swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and linears:
            _replace(model, name, Fp8BlockLinear(module))
            module.weight = None
            swapped += 1
        elif _stacked_experts(module) and not isinstance(module, Fp8BlockExperts):
            _replace(model, name, Fp8BlockExperts(module))
            module.w13 = module.w2 = None
            swapped += 2
    if swapped:
        log.info("fp8 128x128 block weights on the GPU: %d weights quantized after loading", swapped)
    return swapped


# ---- int8 (W8A8, or weights only) ------------------------------------------------------------------
def quantize_int8(model: nn.Module, weight_only: bool = False, handoffs: bool = True) -> list[str]:
    """Swap every `Linear` whose shape int8 allows (int8.py) for an `Int8Linear`; the others keep
    the model's dtype. W8A8 (with `handoffs`): a norm or SiLU-and-multiply whose every reader is
    such a layer quantizes its output rows in its own kernel (fp8's row handoffs, traced the same
    way); the other layers quantize their input themselves. Returns the names of the swapped layers."""
    modules = dict(model.named_modules())
    swapped = [n for n, m in modules.items() if isinstance(m, Linear) and can_quantize_int8(m.weight.shape[1], m.weight.shape[0])]
    kept = sum(isinstance(m, Linear) for m in modules.values()) - len(swapped)
    writers = []
    if handoffs and not weight_only and swapped:
        try:
            writers = row_writers(modules, trace_reads(model), set(swapped))
        except Exception as e:  # the model's code, on the meta device: anything may fail there
            log.warning("int8: the model could not be traced on the meta device (%s): no row handoffs", e)
    for name in swapped:
        linear = modules[name]
        _replace(model, name, Int8Linear(linear, weight_only))
        linear.weight = None  # freed now, layer by layer, as in quantize_fp8
    for name in writers:
        module = modules[name]
        module.__class__ = FP8_VARIANTS[type(module)]
        module.hands_rows = "int8"
    log.info(
        "int8 weights (%s): %d of %d linear layers (%d kept: shape not divisible by 8); %d row handoffs",
        "W8A16" if weight_only else "W8A8",
        len(swapped),
        len(swapped) + kept,
        kept,
        len(writers),
    )
    return swapped


def quantize_model(model: nn.Module, quantization: str | None, handoffs: bool = True) -> None:
    """The quantization pass EngineConfig.quantization names, on a built and loaded model;
    `handoffs=False`: weights alone, no module changes class (a weight swap's twin)."""
    if quantization == "fp8":
        quantize_fp8(model, handoffs)
    elif quantization in INT8_QUANTIZATIONS:
        quantize_int8(model, weight_only=quantization == "int8_weight_only", handoffs=handoffs)
    elif quantization is not None:
        raise ValueError(f"unknown quantization {quantization!r}")
