"""The host tier of the prefix cache (issue 25 part 6): blocks the GPU prefix cache evicts go to
host memory and come back on a hit, for the same tenant only, bounded, cleared by a weight swap."""

from __future__ import annotations

import random

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig
from inferd.engine.block_manager import BlockManager, chain_hash, tenant_salt
from inferd.engine.host_cache import HostCache
from inferd.engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BLOCK = 16
PROMPT = list(range(2, 82))  # 80 tokens: 4 full blocks that can be cached (never the last token's)


def fillers(n: int, vocab: int = 250) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(2, vocab) for _ in range(100)] for _ in range(n)]


def run(llm: LLM, prompt: list[int], tenant: str = "") -> tuple[list[int], int, int]:
    """(greedy tokens, prompt tokens taken from a cache, prompt tokens the prefill computed)."""
    engine = llm.engine
    computed = 0
    launch = engine.runner.launch

    def counting(seqs, is_prefill, prev=None):
        nonlocal computed
        if is_prefill:
            computed += sum(s.num_scheduled_tokens for s in seqs)
        return launch(seqs, is_prefill, prev)

    engine.runner.launch = counting
    try:
        seq = engine.add_request(prompt, GREEDY, tenant=tenant)
        out = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished and o.request_id == seq.request_id:
                    out = o
    finally:
        engine.runner.launch = launch
    return out.token_ids, out.num_cached_tokens, computed


def evict_everything(llm: LLM) -> None:
    """Run prompts that take every GPU block, so that nothing of earlier prompts stays there."""
    for p in fillers(4):
        llm.generate([p], GREEDY)


def small_llm(model_dir, host_gb: float, **kw) -> LLM:
    # 20 GPU blocks: 4 prompts of 100 tokens recycle every one of them.
    kw = {"num_kv_blocks": 20} | kw
    return LLM(str(model_dir), device="cpu", dtype="float32", max_model_len=256, host_kv_cache_gb=host_gb, **kw)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    from test_deepseek import make_deepseek

    path = tmp_path_factory.mktemp("deepseek-v2-host")
    make_deepseek(path, "v2")
    return path


@pytest.mark.parametrize("kind", ["llama", "llama-fp8-kv", "deepseek-mla"])
def test_an_evicted_prefix_comes_back_from_the_host_with_the_same_tokens(kind, llama_dir, deepseek_dir):
    model_dir = deepseek_dir if kind == "deepseek-mla" else llama_dir
    kw = {"kv_cache_dtype": "fp8"} if kind == "llama-fp8-kv" else {}
    llm = small_llm(model_dir, 1e-3, **kw)  # 1 MB: hundreds of the tiny models' blocks
    first, cached, computed = run(llm, PROMPT)
    assert (cached, computed) == (0, 80)
    evict_everything(llm)
    assert not any(llm.engine.block_manager.hash_to_block.get(h) for h in _hashes(PROMPT)), "the GPU still holds it"
    again, cached, computed = run(llm, PROMPT)
    assert (cached, computed) == (64, 16), "the host tier's four blocks were not reused"
    assert again == first
    stats = llm.engine.stats()
    assert stats.host_cache_hits == 4
    assert 0 < stats.host_cache_blocks < stats.host_cache_capacity_blocks
    assert stats.host_cache_bytes == stats.host_cache_blocks * llm.engine.runner.kv_bytes_per_block()

    recompute = small_llm(model_dir, 0, enable_prefix_caching=False, **kw)
    assert run(recompute, PROMPT)[0] == first


def _hashes(prompt: list[int], tenant: str = "") -> list[bytes]:
    out, prefix = [], tenant_salt(tenant)
    for i in range((len(prompt) - 1) // BLOCK):
        prefix = chain_hash(prompt[i * BLOCK : (i + 1) * BLOCK], prefix)
        out.append(prefix)
    return out


def test_without_a_host_tier_the_evicted_prefix_is_recomputed(llama_dir):
    """The control for the test above: the fillers do evict the prompt from the GPU."""
    llm = small_llm(llama_dir, 0)
    run(llm, PROMPT)
    evict_everything(llm)
    assert run(llm, PROMPT)[1:] == (0, 80)
    assert llm.engine.stats().host_cache_capacity_blocks == 0


def test_a_host_hit_is_for_the_same_tenant_only(llama_dir):
    llm = small_llm(llama_dir, 1e-3)
    tokens, _, _ = run(llm, PROMPT, tenant="alice")
    evict_everything(llm)
    assert run(llm, PROMPT, tenant="bob")[1:] == (0, 80)
    assert run(llm, PROMPT, tenant="alice") == (tokens, 64, 16)


def test_a_weight_swap_forgets_the_host_tier(llama_dir):
    llm = small_llm(llama_dir, 1e-3)
    run(llm, PROMPT)
    evict_everything(llm)
    assert llm.engine.stats().host_cache_blocks > 0
    llm.engine.block_manager.forget_prefixes()  # what weight_swap calls once the new weights are in
    assert llm.engine.stats().host_cache_blocks == 0
    assert run(llm, PROMPT)[1:] == (0, 80)


def test_the_host_pool_keeps_the_most_recently_used_blocks_within_its_size():
    kv = torch.arange(2 * 3 * 5 * 4 * 2, dtype=torch.float32).reshape(2, 3, 5, 4, 2)  # [K/V, layers, blocks, ...]
    cache = HostCache(kv, num_slots=2)
    original = kv.clone()
    cache.save(b"a", 0)
    cache.save(b"b", 1)
    assert cache.lookup(b"a")  # a is now the most recent: b goes first
    cache.save(b"c", 2)
    assert cache.num_blocks == 2 and not cache.lookup(b"b") and cache.lookup(b"a") and cache.lookup(b"c")
    assert cache.restore(b"a", 4) and torch.equal(kv[:, :, 4], original[:, :, 0])
    assert cache.restore(b"c", 3) and torch.equal(kv[:, :, 3], original[:, :, 2])
    assert not cache.restore(b"b", 3)
    assert (cache.hits, cache.saved) == (2, 3)


def test_a_restore_never_evicts_the_block_it_restores():
    """A one-slot pool: taking a GPU block for the restore saves that block's old contents, which
    would push out the very entry being restored; the prompt then computes instead of reading garbage."""
    kv = torch.zeros(1, 1, 3, BLOCK, 1)
    bm = BlockManager(2, BLOCK, host_cache=HostCache(kv, num_slots=1))
    for tokens in (list(range(1, 2 * BLOCK + 1)), list(range(100, 100 + 2 * BLOCK))):  # the second evicts the first
        seq = Sequence(tokens, GREEDY, BLOCK)
        bm.allocate_prompt(seq)
        bm.grow(seq, len(seq))
        bm.mark_computed(seq, len(seq))
        bm.free(seq)
    assert bm.host_cache.num_blocks == 1
    again = Sequence(list(range(1, 2 * BLOCK + 2)), GREEDY, BLOCK)
    bm.allocate_prompt(again)
    assert again.num_cached_tokens == 0 and again.block_table == [] and bm.host_cache.hits == 0
    assert bm.num_free == 2


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"host_kv_cache_gb": -1}, "host_kv_cache_gb must be >= 0"),
        ({"host_kv_cache_gb": "lots"}, "host_kv_cache_gb must be a number"),
        ({"host_kv_cache_gb": 4, "enable_prefix_caching": False}, "set enable_prefix_caching true"),
        ({"host_kv_cache_gb": 4, "tensor_parallel_size": 2}, "tensor_parallel_size > 1"),
    ],
)
def test_bad_host_cache_settings_are_refused_by_name(changes, needle):
    with pytest.raises(ValueError, match=needle):
        EngineConfig(model="m", **changes)


def test_host_tier_metrics_exist_from_start_up_and_follow_the_engine(llama_dir):
    pytest.importorskip("prometheus_client")
    from inferd.server import metric_names as n
    from inferd.server.metrics import EngineCollector

    def values(stats):
        return {f.name: f.samples[0].value for f in EngineCollector(lambda: stats).collect()}

    names = (n.HOST_KV_CACHE_HITS, n.HOST_KV_CACHE_BLOCKS, n.HOST_KV_CACHE_CAPACITY, n.HOST_KV_CACHE_BYTES)
    assert all(values(None)[name] == 0 for name in names)
    llm = small_llm(llama_dir, 1e-3)
    run(llm, PROMPT)
    evict_everything(llm)
    run(llm, PROMPT)
    got = values(llm.engine.stats())
    assert got[n.HOST_KV_CACHE_HITS] == 4 and got[n.HOST_KV_CACHE_CAPACITY] > got[n.HOST_KV_CACHE_BLOCKS] > 0


def test_serve_flag_reaches_the_engine_config_and_a_bad_value_exits_naming_it(llama_dir, tmp_path):
    pytest.importorskip("fastapi")
    from test_cli import inferd

    r = inferd("serve", "--model", str(llama_dir), "--data-dir", str(tmp_path), "--host-kv-cache-gb", "-1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "host_kv_cache_gb must be >= 0" in r.stderr and "Traceback" not in r.stderr


def test_an_in_place_weight_swap_leaves_no_old_block_in_the_host_tier(tmp_path):
    import asyncio

    from inferd.engine.async_engine import AsyncLLMEngine
    from inferd.testing import make_model

    for name, seed in (("a", 1), ("b", 2)):
        make_model(tmp_path / name, arch="llama", heads=4, kv_heads=2, seed=seed)
    served = small_llm(tmp_path / "a", 1e-3)
    run(served, PROMPT)
    evict_everything(served)
    assert served.engine.stats().host_cache_blocks > 0
    aengine = AsyncLLMEngine(served.engine)
    try:
        aengine.swap_weights(str(tmp_path / "b"))

        async def main():
            return [o async for o in aengine.generate(PROMPT, GREEDY)][-1]

        out = asyncio.run(main())
    finally:
        aengine.shutdown()
    assert out.num_cached_tokens == 0, "K/V of the old weights came back from the host tier"
    assert out.token_ids == run(small_llm(tmp_path / "b", 0), PROMPT)[0]


def test_under_preemption_and_churn_the_host_tier_keeps_every_answer(llama_dir):
    """Prompts sharing prefixes through a cache too small for them: blocks go to the host and
    come back between preemptions, and every answer is what the prompt gives alone."""
    rng = random.Random(3)
    systems = [[rng.randrange(2, 250) for _ in range(48)] for _ in range(3)]
    prompts = [systems[i % 3] + [rng.randrange(2, 250) for _ in range(rng.randrange(5, 40))] for i in range(9)]
    alone = small_llm(llama_dir, 0, enable_prefix_caching=False, num_kv_blocks=None)
    expected = [alone.generate([p], GREEDY)[0].token_ids for p in prompts]
    llm = small_llm(llama_dir, 1e-3)
    for _ in range(2):
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.stats().host_cache_hits > 0


def test_closing_the_engine_frees_its_kv_cache_despite_the_host_tier(llama_dir):
    import gc

    llm = small_llm(llama_dir, 1e-3)
    run(llm, PROMPT)
    host = llm.engine.block_manager.host_cache
    llm.engine.close()
    gc.collect()
    with pytest.raises(RuntimeError, match="engine closed"):
        host.save(b"any", 0)


def test_a_host_tier_too_small_for_one_block_is_refused_by_name(llama_dir):
    with pytest.raises(ValueError, match="at least one block: raise host_kv_cache_gb"):
        small_llm(llama_dir, 1e-9)
