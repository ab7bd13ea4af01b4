"""The fp8 KV cache (kv_cache_dtype="fp8"): half the bytes per token of bf16, close attention,
and the engine's guarantees (batch invariance, prefix caching, preemption) unchanged."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig
from inferd.layers.attention import decode_attention_reference, store_kv

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def test_decode_attention_over_an_fp8_cache_is_close_to_full_precision():
    torch.manual_seed(0)
    blocks, block_size, kv_heads, head_dim, heads = 12, 16, 2, 32, 8
    caches = {}
    k, v = torch.randn(150, kv_heads, head_dim) * 3, torch.randn(150, kv_heads, head_dim)
    k[7, 0, 3] = 1e4  # an outlier saturates at 448 instead of becoming inf/nan
    slots = torch.randperm(blocks * block_size)[:150]
    for dtype in (torch.float32, torch.float8_e4m3fn):
        kc = torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype)
        vc = torch.zeros_like(kc)
        store_kv(k, v, kc, vc, slots)
        caches[dtype] = (kc, vc)
    fp8_k = caches[torch.float8_e4m3fn][0].view(-1, kv_heads, head_dim)[slots].float()
    assert fp8_k[7, 0, 3] == 448 and torch.isfinite(fp8_k).all()
    assert caches[torch.float8_e4m3fn][0].element_size() * 4 == caches[torch.float32][0].element_size()
    # Three sequences over the stored tokens, through their block tables.
    table = slots.view(-1)[: 9 * block_size] // block_size
    tables = torch.stack([table[i * block_size : (i + 3) * block_size : block_size] for i in range(3)]).int()
    lens = torch.tensor([40, 17, 48], dtype=torch.int32)
    q = torch.randn(3, heads, head_dim)
    full = decode_attention_reference(q, *caches[torch.float32], tables, lens, head_dim**-0.5)
    fp8 = decode_attention_reference(q, *caches[torch.float8_e4m3fn], tables, lens, head_dim**-0.5)
    assert (fp8 - full).norm() / full.norm() < 0.08
    assert not torch.equal(fp8, full), "the fp8 cache did not round anything"


def test_an_fp8_kv_cache_holds_its_tokens_in_a_quarter_of_float32(llama_dir):
    full = LLM(str(llama_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 24)
    fp8 = LLM(str(llama_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 24, kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.num_blocks == 4 * full.engine.runner.num_blocks
    prompts = [list(range(3 + i, 40 + 5 * i)) for i in range(4)]
    a = [o.token_ids for o in full.generate(prompts, GREEDY)]
    b = [o.token_ids for o in fp8.generate(prompts, GREEDY)]
    # Every attention reads rounded K/V now: mostly the same tokens, not necessarily all.
    assert sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb)) >= 0.5 * sum(map(len, a))


def test_fp8_kv_keeps_batch_invariance_prefix_caching_and_preemption(llama_dir):
    system = list(range(2, 66))
    prompts = [system + list(range(100 + 7 * i, 110 + 9 * i)) for i in range(8)]
    alone_llm = LLM(str(llama_dir), device="cpu", dtype="float32", kv_cache_dtype="fp8", enable_prefix_caching=False)
    alone = [alone_llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=24, max_model_len=256)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0, "the test did not force a preemption"
    assert llm.engine.block_manager.prefix_hits > 0
    assert [o.token_ids for o in outs] == alone


def test_unknown_kv_cache_dtype_is_refused_by_name(llama_dir):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto', 'fp8'\], got 'int4'"):
        EngineConfig(model=str(llama_dir), kv_cache_dtype="int4")
