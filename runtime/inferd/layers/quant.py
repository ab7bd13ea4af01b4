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

import torch

from inferd.layers.fused import cuda_compiled

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ROWWISE_MIN_ROWS = 512  # from this many tokens on, row-wise scales in the GEMM's epilogue
_ONE: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    if device not in _ONE:
        _ONE[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ONE[device]


def check_supported(quantization: str | None, device: torch.device) -> None:
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


@cuda_compiled
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> fp8 (M, K) and float32 scales (M, 1), one per token."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@cuda_compiled
def scale_product(product, x_scale, weight_scale, bias, dtype: torch.dtype):
    """The product of fp8 values times the token and channel scales (plus the bias): the CPU
    emulation's last step, and on CUDA the tensor-wise variant measured in bench_fp8_gemm.py."""
    out = product.float() * x_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    shape = x.shape
    xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    if x.is_cuda and xq.shape[0] < ROWWISE_MIN_ROWS:
        one = _one(x.device)
        product = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        out = scale_product(product, x_scale, weight_scale, bias, x.dtype)
    elif x.is_cuda:
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=x.dtype)
        if bias is not None:
            out = out + bias
    else:
        out = scale_product(xq.float() @ weight.float().t(), x_scale, weight_scale, bias, x.dtype)
    return out.view(*shape[:-1], weight.shape[0])


def can_quantize(in_features: int, out_features: int) -> bool:
    """`_scaled_mm` needs both dimensions divisible by 16."""
    return in_features % 16 == 0 and out_features % 16 == 0
