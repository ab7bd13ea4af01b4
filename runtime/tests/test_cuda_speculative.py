"""Speculative decoding on CUDA (Triton kernels, the draft model's decode graphs, the verify pass
on the chunked-prefill path): run on the GPU machine through the device tool (no server import);
skipped where there is no GPU."""

from __future__ import annotations

import random

import pytest
import torch

from inferd import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def prompts() -> list[list[int]]:
    rng = random.Random(5)
    out = []
    for n in (14, 21, 27):
        phrase = [rng.randrange(2, 512) for _ in range(n)]
        out.append(phrase * 3 + phrase[:4])
    return out + [[rng.randrange(2, 512) for _ in range(40)]]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_spec_on_cuda_is_the_plain_cuda_output(llama_dir, method):
    # float32: the verify pass (chunk path) and plain decode (Triton decode kernel) then agree to
    # far below the logits' gaps, so greedy picks are the same token for token.
    plain = LLM(str(llama_dir), device="cuda", dtype="float32", num_kv_blocks=512, cuda_graph_max_batch=32)
    want = [o.token_ids for o in plain.generate(prompts(), GREEDY)]
    plain.engine.close()  # its graphs and cache go now, not when a cycle is collected
    extra = {"draft_model": str(llama_dir)} if method == "draft_model" else {}
    llm = LLM(
        str(llama_dir), device="cuda", dtype="float32", num_kv_blocks=512, cuda_graph_max_batch=32,
        speculative={"method": method, "num_speculative_tokens": 4, **extra},
    )  # fmt: skip
    if method == "draft_model":
        assert llm.engine.spec.drafter.runner.graphs, "the draft model's decode graphs were not captured"
    free = llm.engine.block_manager.num_free
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY)] == want
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens > 0
    assert llm.engine.block_manager.num_free == free


def test_sampled_bf16_spec_runs_on_cuda(llama_dir):
    llm = LLM(
        str(llama_dir), device="cuda", dtype="bfloat16", num_kv_blocks=512, cuda_graph_max_batch=32,
        speculative={"method": "draft_model", "draft_model": str(llama_dir), "num_speculative_tokens": 3},
    )  # fmt: skip
    params = SamplingParams(max_tokens=30, temperature=0.9, top_k=50, seed=3, ignore_eos=True)
    a = [o.token_ids for o in llm.generate(prompts(), params)]
    assert all(len(t) == 30 for t in a)
    assert llm.engine.stats().spec_accepted_tokens > 0
