"""The pre-norm decoder every architecture here shares: embed, N residual blocks, norm, LM head.

An architecture supplies its own attention and MLP; the residual wiring and the module names
(which are the checkpoint's tensor names) live here once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from inferd.layers.embed_head import LMHead, VocabEmbedding
from inferd.layers.norm import RMSNorm
from inferd.models.config import ModelConfig


class PreNormDecoderLayer(nn.Module):
    """A subclass sets self_attn, mlp, input_layernorm and post_attention_layernorm."""

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Iterable[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """A DecoderModel under an LM head (tied to the embedding where the config says so)."""

    def __init__(self, cfg: ModelConfig, layers: Iterable[nn.Module]):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, layers)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
