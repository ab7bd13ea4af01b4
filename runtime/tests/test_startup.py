"""Start-up: on the CPU, LLM(...) loads the weights and allocates a KV cache of fixed size, and runs
no forward pass (the warm-up prefill that sizes the cache on CUDA measures nothing there, and was
most of a 135M model's start-up)."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.models.llama import LlamaForCausalLM


@pytest.fixture
def forward_calls(monkeypatch):
    """The number of tokens in each forward pass of the model (Llama and Qwen2 alike)."""
    calls: list[int] = []
    forward = LlamaForCausalLM.forward

    def counted(self, input_ids, positions):
        calls.append(input_ids.shape[0])
        return forward(self, input_ids, positions)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counted)
    return calls


def test_cpu_start_up_runs_no_forward_pass(llama_dir, forward_calls):
    llm = LLM(str(llama_dir), device="cpu", cpu_kv_cache_bytes=1 << 24)
    assert forward_calls == []
    runner = llm.engine.runner
    assert runner.num_blocks == (1 << 24) // runner.kv_bytes_per_block()
    # The first request needs nothing a warm-up would have prepared.
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and forward_calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_start_up_sizes_the_kv_cache_after_one_warm_up_prefill(llama_dir, forward_calls):
    LLM(str(llama_dir), device="cuda", enforce_eager=True, max_num_batched_tokens=512)
    assert forward_calls == [512]
