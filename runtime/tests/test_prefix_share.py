"""Requests arriving together with a shared prefix compute it once (issue 25 part 3): a waiting
request whose next uncached block another sequence is computing waits for it, then hits the cache."""

from __future__ import annotations

import random

import pytest

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig
from inferd.engine.block_manager import BlockManager
from inferd.engine.scheduler import Scheduler
from inferd.engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BLOCK = 4
SHARED = list(range(2, 18))  # four full blocks of 4


def requests(n: int, prefix: list[int], suffix_len: int = 8, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [prefix + [rng.randrange(2, 512) for _ in range(suffix_len)] for _ in range(n)]


def computed_prompt_tokens(outs) -> int:
    return sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)


@pytest.fixture(scope="module")
def alone(llama_dir):
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", enable_prefix_caching=False)
    return lambda prompts: [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_a_burst_sharing_a_prefix_computes_it_once(llama_dir, alone):
    prompts = requests(8, list(range(2, 66)))  # 64 shared tokens: four blocks of 16
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", enable_prefix_caching=True)
    outs = llm.generate(prompts, GREEDY)
    # Without waiting, all eight are admitted in one step and compute 8 x 72 = 576 tokens.
    assert computed_prompt_tokens(outs) == 64 + 8 * 8, [o.num_cached_tokens for o in outs]
    assert [o.token_ids for o in outs] == alone(prompts)


def test_the_wait_lasts_while_a_prefix_is_computed_in_chunks(llama_dir, alone):
    prompts = requests(6, list(range(2, 98)))  # 96 shared tokens, computed in chunks of 40
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", max_num_batched_tokens=40)
    outs = llm.generate(prompts, GREEDY)
    # Admitted alongside the first one's last chunk, the others would find only 80 tokens cached.
    assert sorted(o.num_cached_tokens for o in outs) == [0] + [96] * 5
    assert [o.token_ids for o in outs] == alone(prompts)


def scheduler(max_num_seqs: int = 8, tokens: int = 8192) -> Scheduler:
    cfg = EngineConfig(model="unused", max_num_seqs=max_num_seqs, block_size=BLOCK)
    cfg.max_num_batched_tokens = tokens
    return Scheduler(cfg, BlockManager(64, BLOCK, enable_prefix_caching=True), max_model_len=1024)


def seq(prompt: list[int], tenant: str = "a", priority: int = 0, **params) -> Sequence:
    return Sequence(prompt, SamplingParams(max_tokens=4, **params), BLOCK, tenant=tenant, priority=priority)


def step(s: Scheduler) -> list[Sequence]:
    batch, is_prefill = s.schedule()
    assert is_prefill
    s.advance(batch, [])  # launched: its blocks are committed
    return batch


def test_a_waiting_request_is_admitted_with_the_prefix_cached_a_step_later():
    s = scheduler()
    first, second = seq(SHARED + [20, 21]), seq(SHARED + [30, 31])
    s.add_all([first, second])
    assert step(s) == [first]
    assert step(s) == [second]
    assert second.num_cached_tokens == len(SHARED)


@pytest.mark.parametrize("stop", ["abort", "finish", "preempt"])
def test_the_wait_ends_when_the_sequence_computing_the_prefix_stops(stop):
    s = scheduler()
    first, second = seq(SHARED + [20, 21]), seq(SHARED + [30, 31])
    s.add_all([first, second])
    batch, _ = s.schedule()
    assert batch == [first] and second in s.waiting
    # Stopped before its step was launched: its blocks were never committed.
    if stop == "abort":
        s.abort(first)
    elif stop == "finish":
        s.finish(first, "stop")
    else:
        s._preempt(first)
        s.waiting.remove(first)  # out of the way: the waiter must not depend on it coming back
    batch, _ = s.schedule()
    assert batch == [second]
    assert second.num_cached_tokens == 0


def test_another_tenants_identical_prefix_is_not_waited_on():
    s = scheduler()
    mine, theirs = seq(SHARED + [20, 21], tenant="a"), seq(SHARED + [20, 21], tenant="b")
    s.add_all([mine, theirs])
    assert step(s) == [mine, theirs]
    assert theirs.num_cached_tokens == 0


def test_requests_that_do_not_share_go_ahead_of_a_waiting_one():
    s = scheduler()
    computer = seq(SHARED + [20, 21], priority=1)
    sharer = seq(SHARED + [30, 31], priority=1)
    other = seq(list(range(100, 118)), priority=0)  # a lower class, sharing nothing
    s.add_all([computer, sharer, other])
    assert step(s) == [computer, other]
    assert step(s) == [sharer] and sharer.num_cached_tokens == len(SHARED)


def test_a_prompt_scored_token_by_token_does_not_wait():
    s = scheduler()
    first, scored = seq(SHARED + [20, 21]), seq(SHARED + [30, 31], prompt_logprobs=True)
    s.add_all([first, scored])
    assert step(s) == [first, scored]
