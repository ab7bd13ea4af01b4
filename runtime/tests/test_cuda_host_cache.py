"""The host KV tier on the GPU (pinned pool, copies on a side stream ordered against the compute
stream, CUDA graphs): an evicted prefix comes back with the same greedy tokens; run on the GPU
machine through the device tool, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_an_evicted_prefix_comes_back_from_pinned_memory_with_the_same_tokens(llama_dir, kv_cache_dtype):
    llm = LLM(
        str(llama_dir),
        device="cuda",
        num_kv_blocks=32,
        max_model_len=256,
        host_kv_cache_gb=0.01,
        kv_cache_dtype=kv_cache_dtype,
    )
    host = llm.engine.block_manager.host_cache
    assert host.pool.is_pinned()
    prompt = list(range(2, 162))  # 160 tokens: 9 cacheable blocks
    first = llm.generate([prompt], GREEDY)[0]
    # Fillers run in batches, so that saves and restores overlap with steps in flight.
    g = torch.Generator().manual_seed(0)
    fillers = [torch.randint(3, 500, (150,), generator=g).tolist() for _ in range(12)]
    for i in range(0, len(fillers), 3):
        llm.generate(fillers[i : i + 3], GREEDY)
    assert host.saved > 0
    again = llm.generate([prompt, *fillers[:2]], GREEDY)
    assert again[0].num_cached_tokens == 144 and host.hits >= 9
    assert again[0].token_ids == first.token_ids
