"""FP8 (e4m3) linear layers: weights quantized once after loading, one scale per output channel;
activations quantized per token at run time, one scale per row. Per-row scales keep a token's
result independent of the other tokens in its batch (batch invariance holds as in bf16).

On CUDA (compute capability 8.9+: Ada, Hopper) the product runs through `torch._scaled_mm`, with
the kernel chosen by the number of rows (measured on the H200 with runtime/bench/bench_fp8_gemm.py,
BENCHMARKS.md):
- decode sizes (fewer than ROWWISE_MIN_ROWS tokens): unit scales, i.e. cuBLAS's tensor-wise fp8
  kernels, which stream the weights at 3.1-3.9 TB/s (the row-wise CUTLASS kernels reach only
  1.3-3.0 TB/s there), then one fused kernel applies the token and channel scales (and the bias):
  (diag(s_x) Xq)(Wq^T diag(s_w)) = diag(s_x) (Xq Wq^T) diag(s_w);
- prefill sizes: the row-wise kernels with the scales in their epilogue, as fast as tensor-wise
  there, so the separate scaling pass (a third of the GEMM's time at 8,192 rows) disappears.
On the CPU the same arithmetic is emulated (fp8 values widened to float32, scales applied after
the product): the readable reference the CUDA path is tested against."""

from __future__ import annotations

from typing import NamedTuple

import torch

from inferd.layers.fused import FP8, FP8_MAX, QuantizedRows, cuda_compiled, finish, quantize
from inferd.layers.int8 import INT8_QUANTIZATIONS, check_int8_supported

ROWWISE_MIN_ROWS = 512  # from this many tokens on, row-wise scales in the GEMM's epilogue
_ONE: dict[torch.device, torch.Tensor] = {}


class UnscaledProduct(NamedTuple):
    """An fp8 product (M, N) still to be multiplied by x_scale (M, 1) and weight_scale (1, N),
    plus the bias: the kernel that consumes it applies them (`fused.finish`)."""

    product: torch.Tensor
    x_scale: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        """The layer output's shape (model code may read it, as `QuantizedRows.shape`)."""
        return self.product.shape


def unpack(x) -> tuple:
    """A layer output as the flat (value, x_scale, weight_scale, bias) the fused kernels take."""
    return tuple(x) if isinstance(x, UnscaledProduct) else (x, None, None, None)


def _one(device: torch.device) -> torch.Tensor:
    if device not in _ONE:
        _ONE[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ONE[device]


def check_supported(quantization: str | None, device: torch.device) -> None:
    if quantization in INT8_QUANTIZATIONS:
        return check_int8_supported(device)
    if quantization is None:
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"fp8 needs compute capability 8.9 or newer (Ada, Hopper); {name} has less: serve bfloat16")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> fp8 (N, K) and float32 scales (1, N): w ≈ q * scale[column]."""
    scale = (w.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX).view(1, -1)
    q = (w.float() / scale.view(-1, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.contiguous()


quantize_rows = cuda_compiled(quantize)  # fp8 (the default format)
scale_product = cuda_compiled(finish)


def fp8_linear(
    x, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype=None, defer: bool = False
):
    """x (M, K): activations, or rows a fused kernel already quantized (`QuantizedRows`). Returns
    the (M, N) output; with `defer`, at decode sizes, the `UnscaledProduct` for the consuming
    kernel to finish."""
    if isinstance(x, QuantizedRows):
        xq, x_scale = x
    else:
        out_dtype = out_dtype or x.dtype
        xq, x_scale = quantize_rows(x)
    if xq.is_cuda and xq.shape[0] >= ROWWISE_MIN_ROWS:
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)
        return out if bias is None else out + bias
    if xq.is_cuda:
        one = _one(xq.device)
        product = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=out_dtype)
    else:
        product = (xq.float() @ weight.float().t()).to(out_dtype)
    pending = UnscaledProduct(product, x_scale, weight_scale, bias)
    return pending if defer else scale_product(*pending)


def can_quantize(in_features: int, out_features: int) -> bool:
    """`_scaled_mm` needs both dimensions divisible by 16."""
    return in_features % 16 == 0 and out_features % 16 == 0
