"""Token embedding and LM head, vocabulary-parallel (as in nano-vllm): rank r holds rows
[r * n, (r + 1) * n) of the vocabulary, n = ceil(vocab / tp_size) (the last rank's slice padded
with zero rows). The embedding sums each rank's rows (other ranks' ids give zeros) with one
all-reduce; the head gathers every rank's logits. One rank: the plain layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_size
from inferd.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if tp_size() == 1 or loaded.shape[0] != self.vocab_size:
            default_weight_loader(param, loaded)
            return
        mine = loaded[self.start : self.start + self.rows]
        param.data.zero_()
        default_weight_loader(param.data[: mine.shape[0]], mine)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out)


class LMHead(VocabEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if tp_size() == 1:
            return logits
        return all_gather_last_dim(logits)[..., : self.vocab_size]
