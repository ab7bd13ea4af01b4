"""Speculative decoding on CUDA (Triton kernels, the draft model's decode graphs, the verify pass
as decode rows, in bf16 computed as batch-1 steps): run on the GPU machine through the device
tool (no server import); skipped where there is no GPU."""

from __future__ import annotations

import random

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.testing import compare_verify_rows

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
        speculative={"method": method, "num_speculative_tokens": 4, "adaptive": False, **extra},
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
        speculative={"method": "draft_model", "draft_model": str(llama_dir), "num_speculative_tokens": 3, "adaptive": False},
    )  # fmt: skip
    params = SamplingParams(max_tokens=30, temperature=0.9, top_k=50, seed=3, ignore_eos=True)
    a = [o.token_ids for o in llm.generate(prompts(), params)]
    assert all(len(t) == 30 for t in a)
    assert llm.engine.stats().spec_accepted_tokens > 0


@pytest.mark.parametrize("eager", [False, True])
def test_bf16_verify_rows_are_the_batch_one_steps_bit_for_bit(llama_dir, eager):
    """bf16 with the batch-1 GEMV kernels: each row of a verify pass of one sequence is computed as
    the 1-row step computes it (the GEMV kernels over rows, attention split as for one sequence,
    the LM head row by row), so its logits are that step's bit for bit, in the verify graphs and
    eagerly. Before, the rows ran cuBLAS and the step the GEMV kernels: few rows were equal."""
    small = dict(device="cuda", dtype="bfloat16", num_kv_blocks=512, cuda_graph_max_batch=32, enforce_eager=eager)
    plain = LLM(str(llama_dir), **small)
    prompt = prompts()[0]
    oracle = plain.generate([prompt], GREEDY)[0].token_ids
    plain.engine.close()
    llm = LLM(str(llama_dir), **small, speculative={"method": "ngram", "num_speculative_tokens": 4, "adaptive": False})
    runner = llm.engine.runner
    assert runner.fused_gemv and runner.verify_rows == [2, 3, 4, 5]
    assert sorted(runner.verify_graphs) == ([] if eager else [2, 3, 4, 5])
    stats = compare_verify_rows(llm.engine, prompt, oracle, 40)
    assert stats["rows"] >= 20
    assert stats["bitwise_equal"] == stats["rows"], stats


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_bf16_greedy_spec_at_batch_one_is_the_plain_output(llama_dir, method):
    """One request at a time in bf16: speculative greedy tokens are plain decoding's, token for token."""
    small = dict(device="cuda", dtype="bfloat16", num_kv_blocks=512, cuda_graph_max_batch=32)
    plain = LLM(str(llama_dir), **small)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    want = [plain.generate([p], params)[0].token_ids for p in prompts()]
    plain.engine.close()
    extra = {"draft_model": str(llama_dir)} if method == "draft_model" else {}
    llm = LLM(str(llama_dir), **small, speculative={"method": method, "num_speculative_tokens": 4, "adaptive": False, **extra})
    assert [llm.generate([p], params)[0].token_ids for p in prompts()] == want
    assert llm.engine.stats().spec_accepted_tokens > 0
