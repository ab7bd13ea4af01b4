"""Batch invariance: a prompt's greedy tokens do not depend on what it is batched with, on prefix
caching, on chunked prefill or on preemption."""

from __future__ import annotations

import random

import pytest

from inferd import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def mixed_prompts(n: int, vocab: int, seed: int = 1, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(2, vocab) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


@pytest.fixture(scope="module")
def alone(llama_dir):
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", enable_prefix_caching=False)

    def run(prompts):
        return [llm.generate([p], GREEDY)[0].token_ids for p in prompts]

    return run


def test_same_tokens_alone_and_in_a_batch_of_16(llama_dir, alone):
    prompts = mixed_prompts(16, 512)
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", enable_prefix_caching=False)
    batched = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert batched == alone(prompts)


def test_prefix_cache_hits_and_keeps_tokens(llama_dir, alone):
    system = list(range(2, 66))  # 64 tokens: four full blocks of 16
    prompts = mixed_prompts(16, 512, seed=2, prefix=system)
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", enable_prefix_caching=True)
    first = llm.generate(prompts[:1], GREEDY)[0]
    assert first.num_cached_tokens == 0
    outs = llm.generate(prompts, GREEDY)
    assert all(o.num_cached_tokens >= 64 for o in outs), [o.num_cached_tokens for o in outs]
    assert [o.token_ids for o in outs] == alone(prompts)


def test_chunked_prefill_matches_whole_prefill(llama_dir, alone):
    prompts = mixed_prompts(4, 512, seed=3, prefix=list(range(2, 200)))
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", max_num_batched_tokens=32, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone(prompts)


def test_preemption_resumes_with_the_same_tokens(llama_dir, alone):
    prompts = mixed_prompts(16, 512, seed=4)
    # 40 blocks of 16 tokens cannot hold 16 sequences of up to ~110 tokens: preemption must happen.
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", num_kv_blocks=40, max_model_len=256)
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0, "the test did not force a preemption"
    assert [o.token_ids for o in outs] == alone(prompts)
    assert llm.engine.block_manager.num_free == 40, "blocks leaked after all requests finished"


def test_max_num_seqs_limits_the_running_batch(llama_dir):
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", max_num_seqs=3)
    engine = llm.engine
    for p in mixed_prompts(8, 512, seed=5):
        engine.add_request(p, GREEDY)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    assert peak == 3


def test_a_sequence_preempted_before_its_stop_rule_runs_finishes_cleanly(llama_dir):
    # Stop rules run one step late (overlapped with the next step), so a sequence whose last
    # token is still pending can be preempted by the step scheduled in between.
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", num_kv_blocks=40, max_model_len=256)
    engine = llm.engine
    short = engine.add_request(list(range(3, 20)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.add_request(list(range(5, 40)), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    while not (short.num_output_tokens == 4 and short in engine._pending):
        engine.step()
    engine.scheduler._preempt(short)
    engine.scheduler.max_num_seqs = 1  # the next step must not re-admit it before its stop rule runs
    finished = {out.request_id: out for out in engine.step() if out.finished}
    assert short in engine.scheduler.waiting or short.is_finished
    engine.scheduler.max_num_seqs = 2
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[short.request_id].finish_reason == "length"
    assert len(finished[short.request_id].token_ids) == 4
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.block_manager.num_free == 40, "blocks leaked"
