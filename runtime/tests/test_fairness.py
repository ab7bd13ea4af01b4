"""Sharing the batch between tenants (issue 24): places go by priority class, then to the tenant
holding the fewest running sequences; preemption takes from the lowest class and the biggest
holder; the waiting queue is bounded."""

from __future__ import annotations

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
