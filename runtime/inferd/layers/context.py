"""Attention metadata for the current step, set by the model runner so model code needs no
cache plumbing (the nano-vllm pattern)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    is_prefill: bool = False
    slot_mapping: torch.Tensor | None = None  # [num_tokens]: where each new token's K/V goes
    # Prefill (per sequence): query lengths and total context lengths (cached + new), as Python
    # lists for the per-sequence reference loop, and block tables for context gathering.
    query_lens: list[int] | None = None
    context_lens_list: list[int] | None = None
    # Both: [batch, max_blocks] block tables; decode: [batch] context lengths on the device.
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    # Prefill on CUDA: [batch + 1] int32 offsets of each sequence's new tokens in the flat token
    # batch, for one variable-length attention call.
    cu_seqlens: torch.Tensor | None = None
    max_query_len: int = 0
    # Prefill with cached context on CUDA (half precision, the Triton path): the sequences in
    # groups (attention.ContextGroup), each group's whole contexts gathered for one varlen call.
    context_groups: list | None = None
    # Decode: every row is computed as a batch-1 step computes it, with the same kernels and the
    # same arithmetic (the verify pass of one sequence: speculative greedy output is then plain
    # decoding's, bit for bit). The GEMV kernels take the rows, attention splits each context as
    # it would for one sequence. Only where the batch-1 GEMV pass is installed (gemv_fusion).
    rows_as_one: bool = False


_CONTEXT = AttentionContext()


def get_context() -> AttentionContext:
    return _CONTEXT


def set_context(ctx: AttentionContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    set_context(AttentionContext())
