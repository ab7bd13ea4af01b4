"""fp8 weights with 128x128 block scales (the published DeepSeek-V3/R1 checkpoints), computed as fp8.

The checkpoints store e4m3 weights [N, K] beside `weight_scale_inv` [ceil(N/128), ceil(K/128)]
(w = q * scale per block). Activations are quantized dynamically per token and 128-wide group
(scale = amax / 448), the product accumulates in float32 one 128-deep group at a time, each
group's partial product multiplied by its activation scale and its weight block's scale: the
arithmetic of DeepSeek's own inference kernels, so the weights stay fp8 in memory (half the bytes
of bf16 for a memory-bound decode) and nothing is dequantized ahead of time.

One Triton GEMM serves the plain linear layer and the MoE experts: with a table of token rows
sorted by expert (fused_moe.align_by_expert) each BLOCK_M tile of rows belongs to one expert,
whose weights the program reads; tiles past the used rows exit at once, so the grid depends only
on the shapes and a CUDA graph captures it. bf16 expert weights go through the same kernel.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128  # the checkpoints' weight_block_size, and the activations' group


def act_quant_reference(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [M, ceil(K/group)]): x ≈ q * scale per token and group."""
    m, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(m, groups, group)
    scale = padded.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(m, groups * group)[:, :k], scale


def weight_dequant_reference(weight: torch.Tensor, scale_inv: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """fp8 [N, K] with scales [ceil(N/group), ceil(K/group)] -> float32 [N, K]."""
    n, k = weight.shape
    scale = scale_inv.repeat_interleave(group, 0)[:n].repeat_interleave(group, 1)[:, :k]
    return weight.float() * scale


def quantize_weight_blocks(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> e4m3 [N, K] and scales [ceil(N/group), ceil(K/group)] (amax / 448 per
    block), the inverse of `weight_dequant_reference`: a weight dequantized from such blocks
    comes back to the same fp8 values and scales."""
    n, k = weight.shape
    rows, cols = -(-n // group), -(-k // group)
    padded = torch.nn.functional.pad(weight.float(), (0, cols * group - k, 0, rows * group - n))
    blocks = padded.view(rows, group, cols, group)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(rows * group, cols * group)
    return q[:n, :k].contiguous(), scale


def fp8_block_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight.T with the kernel's arithmetic in float32 (activations quantized the same
    way, so the two differ only by the order of float32 sums): [M, N] in x's dtype."""
    q, s = act_quant_reference(x)
    k = x.shape[1]
    xs = q.float() * s.repeat_interleave(GROUP, 1)[:, :k]
    return (xs @ weight_dequant_reference(weight, weight_scale_inv).T).to(x.dtype)


if triton is not None:

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, stride_s, GROUP_SIZE: tl.constexpr):
        """One program per (row, group): its amax, its scale, its fp8 values."""
        row = tl.program_id(0).to(tl.int64)
        group = tl.program_id(1)
        offs = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        # IEEE divisions (Triton's `/` is the approximate div.full.f32 on CUDA): scales and
        # quotients bit-equal to act_quant_reference's torch divisions, so the two round to the
        # same fp8 values
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-12), 448.0)
        q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * stride_s + group, scale)

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr,
        a_s_ptr,
        b_ptr,
        b_s_ptr,
        c_ptr,
        sorted_ids_ptr,
        tile_expert_ptr,
        M,
        N,
        K,
        stride_am,
        stride_asm,
        stride_be,
        stride_bn,
        stride_bse,
        stride_bsn,
        stride_cm,
        A_ROW_DIV: tl.constexpr,
        GROUPED: tl.constexpr,
        BLOCK_SCALES: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """C[rows] = A[rows // A_ROW_DIV] @ B[expert].T, B [E, N, K] (nn.Linear layout). GROUPED: row
        tile pid_m holds the rows sorted_ids[pid_m*BLOCK_M:...] of expert tile_expert[pid_m] (-1:
        an unused tile), ids >= M are padding. BLOCK_SCALES: A and B fp8, a_s [rows, K/128] and
        b_s [E, N/128, K/128] applied per 128-deep step (BLOCK_K is then 128)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if GROUPED:
            expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
            ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        else:
            expert = tl.zeros([], dtype=tl.int64)
            ids = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if expert >= 0:
            row_mask = ids < M
            # 32-bit offsets inside one expert's matrix and the activations (a pointer tensor of
            # 64-bit offsets takes the registers of a whole tile: 255 and spills, by ptxas -v)
            a_rows = ids // A_ROW_DIV
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
            b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
            a_s_ptrs = a_s_ptr + a_rows * stride_asm
            b_s_ptrs = b_s_ptr + expert * stride_bse + (offs_n // 128) * stride_bsn
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_mask = offs_k < K - k0
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if UPCAST:  # Triton's CPU interpreter multiplies only float32 correctly
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if BLOCK_SCALES:
                    a_s = tl.load(a_s_ptrs + k0 // 128, mask=row_mask, other=0.0)
                    b_s = tl.load(b_s_ptrs + k0 // 128, mask=n_mask, other=0.0)
                    acc += tl.dot(a, b, input_precision=PRECISION) * a_s[:, None] * b_s[None, :]
                else:
                    acc += tl.dot(a, b, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            c_rows = ids.to(tl.int64)
            tl.store(
                c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :],
                acc.to(c_ptr.dtype.element_ty),
                mask=row_mask[:, None] & n_mask[None, :],
            )


def _require_triton(what: str) -> None:
    if triton is None:
        raise RuntimeError(f"{what} needs triton (pip install triton); on CPU use the *_reference functions")


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel form of `act_quant_reference` (x [M, K], rows contiguous). Off CUDA the reference
    runs: Triton 3.6's CPU interpreter rounds float32 -> e4m3 wrongly (124.3 to 64)."""
    if x.device.type != "cuda":
        return act_quant_reference(x)
    _require_triton("act_quant")
    m, k = x.shape
    groups = triton.cdiv(k, GROUP)
    q = torch.empty(m, k, device=x.device, dtype=FP8)
    s = torch.empty(m, groups, device=x.device, dtype=torch.float32)
    if m:
        _act_quant_kernel[(m, groups)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), GROUP_SIZE=GROUP)
    return q, s


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out_rows: int,
    *,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    sorted_ids: torch.Tensor | None = None,
    tile_expert: torch.Tensor | None = None,
    a_row_div: int = 1,
    block_m: int = 16,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """[out_rows, N] = rows of `a` times b[expert].T (b [E, N, K]); see `_grouped_gemm_kernel`.
    Without sorted_ids: a plain a @ b[0].T. With scales: fp8 a and b, block-scaled."""
    _require_triton("grouped_gemm")
    _, n, k = b.shape
    block_scales = a_scale is not None
    if block_scales and (b_scale is None or b.dtype != FP8 or a.dtype != FP8):
        raise ValueError("block-scaled grouped_gemm needs fp8 a and b and both scales")
    grouped = sorted_ids is not None
    c = torch.empty(out_rows, n, device=a.device, dtype=out_dtype)
    # 16x64 tiles, 128 deep in fp8 with 8 warps, 64 deep in bf16 with 4: the largest that ptxas
    # fits in registers without spilling on sm_90 (wider tiles spill 100-1,600 bytes a thread);
    # a decode step's few rows per expert would leave bigger tiles empty anyway.
    block_n = 64
    block_k = GROUP if block_scales else 64
    tiles_m = (sorted_ids.numel() // block_m) if grouped else triton.cdiv(out_rows, block_m)
    if out_rows == 0 or tiles_m == 0:
        return c
    dummy = c
    _grouped_gemm_kernel[(tiles_m, triton.cdiv(n, block_n))](
        a,
        a_scale if block_scales else dummy,
        b,
        b_scale if block_scales else dummy,
        c,
        sorted_ids if grouped else dummy,
        tile_expert if grouped else dummy,
        out_rows,
        n,
        k,
        a.stride(0),
        a_scale.stride(0) if block_scales else 0,
        b.stride(0),
        b.stride(1),
        b_scale.stride(0) if block_scales else 0,
        b_scale.stride(1) if block_scales else 0,
        c.stride(0),
        A_ROW_DIV=a_row_div,
        GROUPED=grouped,
        BLOCK_SCALES=block_scales,
        UPCAST=a.device.type == "cpu",
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=8 if block_scales else 4,
        num_stages=3 if a.device.type == "cuda" else 1,
    )
    return c


def check_block_scales(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> None:
    n, k = weight.shape[-2:]
    want = (-(-n // GROUP), -(-k // GROUP))
    if tuple(weight_scale_inv.shape[-2:]) != want:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(weight_scale_inv.shape)}, expected {want} for a weight {tuple(weight.shape)} "
            "in 128x128 blocks (the checkpoint's weight_block_size must be [128, 128])"
        )


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16) @ weight [N, K] (e4m3, block scales [ceil(N/128), ceil(K/128)]) -> [M, N] in
    x's dtype: activations quantized per token and 128-group, the product block-scaled in Triton."""
    check_block_scales(weight, weight_scale_inv)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, s = act_quant(x2)
    out = grouped_gemm(q, weight[None], x2.shape[0], a_scale=s, b_scale=weight_scale_inv[None], out_dtype=x.dtype)
    return out.view(*lead, weight.shape[0])
