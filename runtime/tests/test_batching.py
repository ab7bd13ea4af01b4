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
    while not (short.num_output_tokens == 4 and short.has_pending_token):
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


def _record_launches(engine):
    """Wrap the runner's launch: for each decode step, how many of its sequences had their last
    token still on the device (scheduled before the host read it)."""
    seen = []
    launch = engine.runner.launch

    def recording(seqs, is_prefill, prev=None):
        if not is_prefill:
            seen.append((len(seqs), sum(s.has_pending_token for s in seqs)))
        return launch(seqs, is_prefill, prev)

    engine.runner.launch = recording
    return seen


def test_decode_steps_are_scheduled_before_the_previous_tokens_are_read(llama_dir, alone):
    prompts = mixed_prompts(6, 512, seed=7)
    llm = LLM(str(llama_dir), device="cpu", dtype="float32")
    seen = _record_launches(llm.engine)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone(prompts)
    steady = [(n, pending) for n, pending in seen if n == len(prompts)]
    assert steady and all(pending == n for n, pending in steady), "decode did not overlap the previous step"


def test_penalties_make_the_steps_wait_for_the_host(llama_dir):
    # A penalty needs every earlier token on the host, so no step may start with one pending.
    llm = LLM(str(llama_dir), device="cpu", dtype="float32")
    seen = _record_launches(llm.engine)
    params = [GREEDY, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)]
    prompts = mixed_prompts(2, 512, seed=8)
    penalised = llm.generate(prompts, params)[1]
    assert seen and all(pending == 0 for _, pending in seen)
    assert all(t >= 0 for t in penalised.token_ids)
    reference = LLM(str(llama_dir), device="cpu", dtype="float32").generate([prompts[1]], params[1])[0]
    assert penalised.token_ids == reference.token_ids


def test_aborting_a_request_whose_token_is_still_on_the_device(llama_dir, alone):
    # The step in flight computed a token for it; the abort must drop that token, free the
    # blocks once, and leave the other requests' tokens as they would be alone.
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", num_kv_blocks=40, max_model_len=256)
    engine = llm.engine
    prompts = mixed_prompts(3, 512, seed=11)
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    while not seqs[1].has_pending_token or seqs[1].num_output_tokens < 5:
        engine.step()
    engine.abort_request(seqs[1].request_id)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != seqs[1].request_id, "an aborted request produced output"
            if out.finished:
                finished[out.request_id] = out.token_ids
    assert [finished[seqs[i].request_id] for i in (0, 2)] == alone([prompts[0], prompts[2]])
    assert engine.block_manager.num_free == 40, "blocks leaked or freed twice"


def test_close_frees_the_kv_cache_and_weights_while_the_engine_is_still_referenced(llama_dir):
    """The next engine in a process (a test, a benchmark phase, blue-green) sizes its KV cache from
    the device's free memory: a closed engine that something still references must not hold it."""
    import gc
    import weakref

    llm = LLM(str(llama_dir), device="cpu", dtype="float32")
    runner = llm.engine.runner
    cache = weakref.ref(runner.kv_cache)
    weight = weakref.ref(next(runner.model.parameters()))
    llm.engine.close()
    gc.collect()  # the modules' own reference cycles
    assert cache() is None and weight() is None
    llm.engine.close()  # again: a no-op


@pytest.mark.parametrize("rows,width", [(1, 256), (3, 7), (16, 1)])
def test_a_decode_steps_inputs_lie_packed_in_one_buffer(rows, width):
    """decode_input_views: every input of a step in one byte range (what one copy moves), none
    overlapping another, each on a 16-byte boundary (as tensors of their own are: Triton
    specializes kernels on it), in the dtypes the kernels read."""
    import torch

    from inferd.engine.model_runner import decode_input_bytes, decode_input_views

    size = decode_input_bytes(rows, width)
    buf = torch.zeros(size + 64, dtype=torch.uint8)
    views = decode_input_views(buf, rows, width)
    parts = [views[k] for k in ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables")]
    parts += list(views["pending"])
    assert [views[k].dtype for k in ("input_ids", "context_lens", "block_tables")] == [torch.int64, torch.int32, torch.int32]
    assert views["block_tables"].shape == (rows, width) and views["pending"].shape == (2, rows)
    assert all(p.is_contiguous() and (p.data_ptr() - buf.data_ptr()) % 16 == 0 for p in parts)
    for i, part in enumerate(parts):  # each part marked in turn: one that shared a byte with an
        part.fill_(i + 1)  # earlier part would change that part's mark
    assert all(bool((part == i + 1).all()) for i, part in enumerate(parts))
    assert sum(p.numel() * p.element_size() for p in parts) > size - 16 * len(parts)  # packed, but for the alignment
    assert buf[:size].any() and not buf[size:].any()  # and nothing past the layout's size
