"""Llama architecture: DeepSeek-LLM-7B, DeepSeek-R1-Distill-Llama-8B/70B."""

from __future__ import annotations

import torch
from torch import nn

from inferd.layers.activation import SiluAndMul
from inferd.layers.attention import Attention
from inferd.layers.distributed import divide, make_all_reduce
from inferd.layers.linear import Linear, MergedLinear, QKVLinear
from inferd.layers.norm import RMSNorm
from inferd.layers.rotary import RotaryEmbedding
from inferd.models.config import ModelConfig
from inferd.models.decoder import CausalLM, PreNormDecoderLayer


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int):
        super().__init__()
        # This rank's heads (all of them on one rank).
        heads = divide(cfg.num_attention_heads, "num_attention_heads")
        kv_heads = divide(cfg.num_key_value_heads, "num_key_value_heads")
        self.q_size = heads * cfg.head_dim
        self.kv_size = kv_heads * cfg.head_dim
        self.qkv_proj = QKVLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.attention_bias,
            parallel="column",
        )
        self.o_proj = Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, parallel="row")
        self.reduce = make_all_reduce()
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.attn = Attention(heads, kv_heads, cfg.head_dim, cfg.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.rotary_emb(positions, self.qkv_proj(hidden), self.q_size, self.kv_size)
        out = self.o_proj(self.attn(q, k, v))
        return out if self.reduce is None else self.reduce(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, parallel="column")
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, parallel="row")
        self.reduce = make_all_reduce()
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self.act_fn(self.gate_up_proj(x)))
        return out if self.reduce is None else self.reduce(out)


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: ModelConfig, max_position: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, max_position)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    # checkpoint name fragment -> (fused parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Checkpoint tensors that carry nothing the model needs.
    ignored_checkpoint_tensors = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelConfig, max_position: int):
        super().__init__(cfg, (LlamaDecoderLayer(cfg, max_position) for _ in range(cfg.num_hidden_layers)))

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
