"""INT8 linear layers, for GPUs without fp8 (A100 and older) and for smaller weights anywhere.
Weights are quantized once after loading, symmetric, one scale per output channel:
w[n, :] ≈ q[n, :] * s_w[n], q in [-127, 127] (-128 is left out so that the range is symmetric and
negating a weight never overflows).

Two formats (EngineConfig.quantization):
- `int8` (W8A8): activations are quantized too, per token at run time (dynamic, symmetric), and
  the product runs on int8 tensor cores with an exact int32 accumulator:
  (diag(s_x) Xq)(Wq^T diag(s_w)) = diag(s_x) (Xq Wq^T) diag(s_w). Per-token scales keep a token's
  result independent of the other rows in its batch. On CUDA the product is cuBLAS's through
  `torch._int_mm`, which needs more than 16 rows and K, N multiples of 8: decode batches of 16 or
  fewer rows would be padded with zero rows (a zero row costs nothing in a memory-bound GEMM; the
  weight is read once either way), but up to TRITON_W8A8_MAX_ROWS (every size measured) the Triton
  kernel in int8_kernels.py does the same product with the scales in its epilogue, in one launch,
  and faster; runtime/bench/bench_int8.py measures both at every size.
- `int8_weight_only` (W8A16): activations stay in bfloat16 and the weight is widened inside the
  GEMM (int8_kernels.py on CUDA), the gpt-fast recipe for batch 1, where decode reads every weight
  once per token and half the bytes should nearly halve the step.
On the CPU both are computed by the same arithmetic in PyTorch (`torch._int_mm` is exact int32 on
the CPU too): the reference the CUDA kernels are tested against.

Accuracy (`inferd eval`, SmolLM2-135M-Instruct on runtime/bench/data/eval.txt, CPU, against
float32 at perplexity 26.83; 2026-11-30): int8_weight_only 26.83 with 96.0 % top-1 agreement
(bfloat16: 26.82, 96.9 %); int8 (W8A8) 27.77, 88.6 % (fp8 W8A8: 27.72, 91.4 %). Per-token
activation scales cost this small model what they cost fp8; the weights alone cost nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferd.layers.fused import INT8_MAX, QuantizedRows, cuda_compiled, quantize

INT8_QUANTIZATIONS = ("int8", "int8_weight_only")
# torch._int_mm's CUDA limits (cuBLASLt's int8 kernels): rows > 16, inner and output sizes % 8.
INT_MM_MIN_ROWS = 17
INT_MM_MULTIPLE = 8
# Up to this many rows on CUDA, W8A8 runs the Triton kernel (int8_kernels.py) instead: one GEMM
# with the scales in its epilogue, where torch._int_mm needs a padding copy before and a scaling
# kernel after. Measured on the H200 (docs/bench/2026-11-30-h200-int8.json, the 8B shape's four
# projections, us Triton vs _int_mm): 1 row 11.9 vs 17.5 (qkv); 64 rows 20.0 vs 21.6 (qkv), 69.8 vs
# 64.8 (down, the one loss); 4,096 rows 258 vs 341 (qkv), 1,088 vs 1,459 (gate_up). Above the
# largest measured size, _int_mm.
TRITON_W8A8_MAX_ROWS = 4096


def check_int8_supported(device: torch.device) -> None:
    """int8 tensor cores (IMMA) start with Turing (7.5)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 5):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"int8 needs compute capability 7.5 or newer (Turing and later); {name} has less: serve bfloat16")


def can_quantize_int8(in_features: int, out_features: int) -> bool:
    return in_features % INT_MM_MULTIPLE == 0 and out_features % INT_MM_MULTIPLE == 0


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> int8 (N, K) and float32 scales (1, N): w ≈ q * scale[column]. A row of
    zeros gets a tiny scale and zero codes (no division by zero)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX).view(1, -1)
    q = torch.round(wf / scale.view(-1, 1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> int8 (M, K) and float32 scales (M, 1), one per token (round half to
    even, as `torch.round` and Triton's `rint` do)."""
    return quantize(x, "int8")


def scale_int32(acc: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor, bias, out_dtype: torch.dtype):
    """The layer output from the int32 product: scales and bias in float32, rounded once."""
    out = acc.float() * x_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


_quantize_rows = cuda_compiled(quantize_rows_int8)
# cuda_compiled takes tensors only (a dtype would be a guard each call): the output dtype comes as an
# empty tensor of it.
_scale_int32 = cuda_compiled(lambda acc, xs, ws, bias, like: scale_int32(acc, xs, ws, bias, like.dtype))


def int8_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact int32 product xq (M, K) @ wq (N, K)^T. Pads M up to torch._int_mm's minimum on CUDA."""
    m = xq.shape[0]
    if xq.is_cuda and m < INT_MM_MIN_ROWS:
        padded = F.pad(xq, (0, 0, 0, INT_MM_MIN_ROWS + (-INT_MM_MIN_ROWS) % INT_MM_MULTIPLE - m))
        return torch._int_mm(padded, wq.t())[:m]
    return torch._int_mm(xq, wq.t())


def w8a8_linear(x, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype=None) -> torch.Tensor:
    """x (..., K) in a float dtype, or (M, K) rows a fused kernel already quantized to int8
    (`QuantizedRows`); wq (N, K) int8, w_scale (1, N) -> (..., N) in `out_dtype` (default x's)."""
    if isinstance(x, QuantizedRows):
        shape, (xq, x_scale) = x.q.shape, x
    else:
        shape, out_dtype = x.shape, out_dtype or x.dtype
        xq, x_scale = _quantize_rows(x.reshape(-1, shape[-1]))
    if xq.is_cuda and xq.shape[0] <= TRITON_W8A8_MAX_ROWS:
        from inferd.layers.int8_kernels import w8a8_matmul

        out = w8a8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype)
    else:
        out = _scale_int32(int8_mm(xq, wq), x_scale, w_scale, bias, w_scale.new_empty(0, dtype=out_dtype))
    return out.view(*shape[:-1], wq.shape[0])


def w8a16_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gpt-fast's one line: the int8 weight widened to x's dtype, the channel scale after the product
    (exact: a per-column scale commutes with the sum over K)."""
    out = F.linear(x, wq.to(x.dtype)) * w_scale.view(-1).to(x.dtype)
    return out if bias is None else out + bias


def w8a16_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not x.is_cuda:
        return w8a16_reference(x, wq, w_scale, bias)
    from inferd.layers.int8_kernels import w8a16_matmul

    shape = x.shape
    out = w8a16_matmul(x.reshape(-1, shape[-1]), wq, w_scale, bias)
    return out.view(*shape[:-1], wq.shape[0])


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights (one scale per output channel); `weight_only`: bfloat16
    activations (W8A16), else activations quantized per token (W8A8)."""

    def __init__(self, linear: torch.nn.Module, weight_only: bool = False):
        super().__init__()
        q, scale = quantize_weight_int8(linear.weight.data)
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        # The name the runner's weight_bytes() counts (as fp8's).
        self.register_buffer("weight_scale", scale)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.data, requires_grad=False)
        self.weight_only = weight_only
        self.out_dtype = linear.weight.dtype

    def forward(self, x) -> torch.Tensor:
        """x: activations, or (W8A8) rows the preceding norm or SiLU already quantized."""
        if self.weight_only:
            return w8a16_linear(x, self.weight, self.weight_scale, self.bias)
        return w8a8_linear(x, self.weight, self.weight_scale, self.bias, self.out_dtype)

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return f"in_features={k}, out_features={n}, {'W8A16' if self.weight_only else 'W8A8'}"
