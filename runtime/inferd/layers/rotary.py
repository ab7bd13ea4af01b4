"""Rotary position embeddings (rotate-half layout, as Llama and Qwen2 checkpoints expect), with
the `llama3` frequency scaling used by DeepSeek-R1-Distill-Llama."""

from __future__ import annotations

import math

import torch
from torch import nn

from inferd.layers.fused import qkv_rotary


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq
    if scaling["rope_type"] != "llama3":
        raise ValueError(f"rope type {scaling['rope_type']!r} is not supported (supported: default, llama3)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_sin", torch.stack((emb.cos(), emb.sin())), persistent=False)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, q_size: int, kv_size: int):
        """The fused q/k/v projection's output -> rotated q, k and v."""
        return self.rotate(positions, qkv, None, None, None, q_size, kv_size)

    def rotate(self, positions, x, x_scale, weight_scale, bias, q_size: int, kv_size: int):
        """`fused.qkv_rotary` (a Triton kernel on CUDA) on a projection given as (x, x_scale,
        weight_scale, bias)."""
        args = (positions, x, x_scale, weight_scale, bias, self.cos_sin, self.head_dim, q_size, kv_size)
        if self.cos_sin.is_cuda:
            from inferd.layers.triton_fused import qkv_rotary_triton

            return qkv_rotary_triton(*args)
        return qkv_rotary(*args)
