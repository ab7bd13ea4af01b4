"""Sharing the batch between tenants (issue 24): places go by priority class, then to the tenant
holding the fewest running sequences; preemption takes from the lowest class and the biggest
holder; the waiting queue is bounded."""

from __future__ import annotations

import asyncio

import pytest

from inferd.config import EngineConfig
from inferd.engine.block_manager import BlockManager
from inferd.engine.scheduler import QueueFull, Scheduler
from inferd.engine.sequence import Sequence
from inferd.sampling_params import SamplingParams

BLOCK = 4


def scheduler(max_num_seqs=4, num_blocks=64, max_num_waiting=1024, tokens=8192) -> Scheduler:
    cfg = EngineConfig(model="unused", max_num_seqs=max_num_seqs, max_num_waiting=max_num_waiting, block_size=BLOCK)
    cfg.max_num_batched_tokens = tokens
    return Scheduler(cfg, BlockManager(num_blocks, BLOCK, enable_prefix_caching=False), max_model_len=1024)


def seq(tenant: str, priority: int = 0, prompt: int = 4, max_tokens: int = 100) -> Sequence:
    return Sequence(list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens), BLOCK, tenant=tenant, priority=priority)


def admitted(s: Scheduler) -> list[str]:
    batch, is_prefill = s.schedule()
    assert is_prefill
    return [q.tenant for q in batch]


def test_a_tenant_with_many_sequences_does_not_take_every_place():
    s = scheduler(max_num_seqs=4)
    for _ in range(8):  # one key's n=8 request, queued first
        s.add(seq("heavy"))
    s.add(seq("light"))
    # First come would admit four of heavy's and leave light waiting behind all eight.
    assert sorted(admitted(s)) == ["heavy", "heavy", "heavy", "light"]


def test_places_alternate_between_tenants_in_sequences_not_requests():
    s = scheduler(max_num_seqs=6)
    for _ in range(6):
        s.add(seq("a"))
    for _ in range(6):
        s.add(seq("b"))
    assert sorted(admitted(s)) == ["a", "a", "a", "b", "b", "b"]


def test_a_higher_class_is_admitted_first():
    s = scheduler(max_num_seqs=2)
    for _ in range(3):
        s.add(seq("batch-job", priority=0))
    s.add(seq("interactive", priority=1))
    assert sorted(admitted(s)) == ["batch-job", "interactive"]


def test_preemption_takes_from_the_lowest_class_then_the_biggest_holder():
    # 3 blocks each for the prompt + first token; 10 blocks: three sequences fit, the fourth block
    # for anyone's next token forces a preemption.
    s = scheduler(max_num_seqs=8, num_blocks=10)
    high = seq("vip", priority=1, prompt=8)
    a1, a2 = seq("a", prompt=8), seq("a", prompt=8)
    b1 = seq("b", prompt=8)
    for q in (high, a1, a2, b1):
        s.add(q)
    batch, _ = s.schedule()
    assert set(batch) == {high, a1, a2, b1}  # 8 blocks of 10
    s.advance(batch, complete=list(range(len(batch))))
    for q in batch:  # the pending tokens arrive
        q.token_ids[-1] = 7
        q.pending_row = None
    batch, is_prefill = s.schedule()
    assert not is_prefill
    victims = [q for q in (high, a1, a2, b1) if q not in batch]
    # 10 blocks hold three sequences of 3 blocks: one goes, from tenant "a" (two running, class 0).
    assert len(victims) == 1 and victims[0].tenant == "a"
    assert high in batch and b1 in batch


def test_the_waiting_queue_is_bounded_and_refuses_a_request_whole():
    s = scheduler(max_num_waiting=5)
    s.add_all([seq("a") for _ in range(4)])
    with pytest.raises(QueueFull, match="max_num_waiting 5"):
        s.add_all([seq("b"), seq("b")])  # n=2 would overfill it: neither is queued
    assert [q.tenant for q in s.waiting] == ["a"] * 4
    s.add(seq("c"))
    assert len(s.waiting) == 5


def test_max_num_waiting_must_be_positive():
    with pytest.raises(ValueError, match="max_num_waiting"):
        EngineConfig(model="unused", max_num_waiting=0)


# ---- the server's side: limits in sequences, the queue bound, the key's class ------------------
def test_a_keys_limits_count_sequences_not_requests():
    from inferd.server.limits import Limiter

    lim = Limiter(max_concurrent=4, per_minute=100)
    assert lim.acquire("k", 3) is None
    assert lim.acquire("k", 2).reason == "concurrency"  # 3 + 2 sequences > 4, though only 2 requests
    assert lim.acquire("other", 4) is None
    lim.release("k", 3)
    assert lim.acquire("k", 4) is None
    per_minute = Limiter(max_concurrent=100, per_minute=10)
    assert per_minute.acquire("k", 8) is None
    refused = per_minute.acquire("k", 3)
    assert refused.reason == "rate" and 1 <= refused.retry_after_s <= 60


def test_n_beyond_a_keys_limit_is_a_400_and_a_full_queue_a_429():
    from inferd.server.errors import OpenAIError
    from inferd.server.limits import Limiter, admit
    from inferd.server.metrics import Metrics

    class FullEngine:
        def reserve(self, n):
            return None

    with pytest.raises(OpenAIError) as e:
        admit(Limiter(4, 100), Metrics(), "k", 8)
    assert e.value.status == 400 and e.value.param == "n" and "at most 4" in e.value.message
    lim = Limiter(4, 100)
    with pytest.raises(OpenAIError) as e:
        admit(lim, Metrics(), "k", 2, FullEngine())
    assert e.value.status == 429 and e.value.code == "queue_full" and int(e.value.headers["Retry-After"]) >= 1
    assert lim.active["k"] == 0  # nothing taken for a refused request


def test_the_engine_bounds_its_queue_and_queues_under_tenant_and_priority(llama_dir):
    from inferd.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.start(EngineConfig(model=str(llama_dir), max_num_seqs=2, max_num_waiting=1, max_model_len=64))
    try:
        # Room is held from admission until submission: a burst admitted together cannot overfill.
        first = engine.reserve(2)
        assert first is not None and engine.reserve(2) is None
        second = engine.reserve(1)
        assert second is not None and engine.reserve(1) is None
        first.release()
        first.release()  # twice: nothing more comes back
        assert engine.reserve(3) is None
        held = engine.reserve(2)
        assert held is not None
        second.release()

        async def run_one():  # a submitted sequence takes its place from the reservation
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=2), reservation=held):
                pass

        asyncio.run(asyncio.wait_for(run_one(), 60))
        assert held.left == 1
        held.release()
        assert engine.reserve(3) is not None  # nothing leaked: the whole capacity is free again
        seq = engine.engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), "r1", tenant="key-a", priority=1)
        assert (seq.tenant, seq.priority) == ("key-a", 1)
    finally:
        engine.shutdown()


def test_a_keys_priority_class_is_stored_checked_and_named(tmp_path):
    from inferd.server.auth import KeysFileError, KeyStore, parse_keys

    store = KeyStore(tmp_path / "keys.json")
    store.add("batch", "user", priority="low")
    store.add("desk", "user", priority="high")
    assert {k.name: k.priority for k in parse_keys(store.path)} == {"batch": "low", "desk": "high"}
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        store.add("x", "user", priority="urgent")
    store.path.write_text(store.path.read_text().replace('"low"', '"urgent"'))
    with pytest.raises(KeysFileError, match="priority 'urgent'"):
        parse_keys(store.path)


def test_a_keys_tenant_is_stored_checked_and_shared_only_by_name(tmp_path):
    from inferd.server.auth import KeysFileError, KeyStore, parse_keys

    store = KeyStore(tmp_path / "keys.json")
    store.add("a", "user", tenant="team-x")
    store.add("b", "user", tenant="team-x")
    store.add("c", "user")
    a, b, c = parse_keys(store.path)
    assert a.cache_tenant == b.cache_tenant == "tenant:team-x"
    assert c.cache_tenant == f"key:{c.key_id}" != a.cache_tenant
    with pytest.raises(ValueError, match="not a tenant name"):
        store.add("d", "user", tenant="../x")
    store.path.write_text(store.path.read_text().replace('"team-x"', '"team x"', 1))
    with pytest.raises(KeysFileError, match="key 'a': tenant 'team x' is not a tenant name"):
        parse_keys(store.path)


# ---- the prefix cache is shared within a tenant only (issue 24: a cross-tenant hit is a timing leak)
def test_a_tenants_prompt_never_hits_another_tenants_cache(llama_dir):
    from inferd.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=256, block_size=16))
    prompt = list(range(3, 3 + 80))  # four full blocks before the last token's
    sp = SamplingParams(max_tokens=2)

    def run(rid: str, tenant: str) -> int:
        seq = engine.add_request(prompt, sp, rid, tenant=tenant)
        while engine.has_unfinished_requests():
            engine.step()
        return seq.num_cached_tokens

    assert run("a1", "key-a") == 0
    assert run("b1", "key-b") == 0  # the same prompt, another key: computed again, no timing signal
    assert run("a2", "key-a") == 64  # the same key: its own four blocks are reused
    assert run("b2", "key-b") == 64


def test_a_request_the_full_queue_refuses_leaves_nothing_in_the_engine(llama_dir):
    from inferd.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_model_len=64, max_num_waiting=1))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), "r1")
    with pytest.raises(QueueFull):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), "r2")
    assert "r2" not in engine.sequences and "r2" not in engine._detoks
