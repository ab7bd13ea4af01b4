"""Sampling settings per request."""

from __future__ import annotations

import math

import pytest
import torch
from triton_interpreter import _interpreter_scalars, needs_interpreter  # noqa: F401  (autouse fixture)

from inferd import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), device="cpu", dtype="float32")


PROMPT = "The quick brown fox"


def test_same_seed_same_output_even_in_another_batch(llm):
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    a = llm.generate([PROMPT], sp)[0].token_ids
    b = llm.generate(["other prompt", PROMPT, "0123"], [SamplingParams(max_tokens=5, temperature=1.0), sp, sp])[1].token_ids
    assert a == b
    c = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True))[0].token_ids
    assert c != a


def test_the_ends_of_the_seed_range_sample(llm):
    from inferd.sampling_params import SEED_MAX

    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=seed, ignore_eos=True) for seed in (0, SEED_MAX)]
    assert [len(o.token_ids) for o in llm.generate([PROMPT, PROMPT], params)] == [3, 3]


def test_top_k_1_is_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids
    topk = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=5.0, top_k=1, seed=3, ignore_eos=True))[0].token_ids
    assert topk == greedy


def test_tiny_top_p_and_min_p_are_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0].token_ids
    top_p = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True))[0]
    min_p = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=1.0, min_p=1.0, seed=3, ignore_eos=True))[0]
    assert top_p.token_ids == greedy
    assert min_p.token_ids == greedy


def test_penalties_stop_repetition(llm):
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0].token_ids
    assert len(set(plain)) < len(plain), "the test needs a model that repeats itself greedily"
    for sp in (
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, presence_penalty=2.0),
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, repetition_penalty=1e6),
    ):
        out = llm.generate([PROMPT], sp)[0].token_ids
        assert len(set(out)) > len(set(plain))
    forbid = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, repetition_penalty=1e9)
    prompt_ids = llm.engine.tokenize(PROMPT)
    out = llm.generate([PROMPT], forbid)[0].token_ids
    assert len(set(out)) == len(out) and not set(out) & set(prompt_ids)


def test_max_tokens_stop_token_ids_and_finish_reason(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    stop_at = out.token_ids[3]
    first = out.token_ids.index(stop_at)
    stopped = llm.generate([PROMPT], SamplingParams(max_tokens=7, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert stopped.token_ids == out.token_ids[: first + 1] and stopped.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm):
    full = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    assert len(full.text) > 6
    stop = full.text[4:6]
    out = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]


def test_eos_ends_generation_unless_ignored(llm):
    eos = 1
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    full = llm.generate([PROMPT], params)[0].token_ids
    # Make EOS the token generated third: the engine must stop there.
    llm.engine.eos_token_ids.add(full[2])
    try:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0.0))[0]
        assert out.token_ids == full[: full.index(full[2]) + 1] and out.finish_reason == "stop"
        assert llm.generate([PROMPT], params)[0].token_ids == full
    finally:
        llm.engine.eos_token_ids.discard(full[2])
        llm.engine.eos_token_ids.add(eos)


def test_logprobs_are_those_of_the_chosen_tokens(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True))[0]
    assert len(out.logprobs) == 5
    assert all(lp <= 0 and math.isfinite(lp) for lp in out.logprobs)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=float("nan")),
        dict(temperature=-1),
        dict(max_tokens=0),
        dict(top_p=0),
        dict(top_k=0),
        dict(min_p=2),
        dict(repetition_penalty=0),
        dict(seed=-1),
        dict(seed=2**64),  # torch.Generator.manual_seed raises past 2**64 - 1: in the engine thread, for everyone
        dict(seed=2**70),
        dict(seed=1.5),
        dict(max_tokens=True),
        dict(stop_token_ids=[-1]),
        dict(stop=[""]),
        dict(stop=["a", "b", "c", "d", "e"]),  # searched after every token, in the one engine thread
        dict(stop=["x" * 257]),
    ],
)
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_prompt_longer_than_context_is_refused(llama_dir):
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="context"):
        llm.generate([list(range(2, 80))], SamplingParams(max_tokens=4))


@needs_interpreter
def test_the_two_pass_argmax_finds_the_first_maximum_as_argmax_does():
    """triton_fused.argmax_rows (the greedy token of a few rows on CUDA) through Triton's
    interpreter: ties across and inside its 2,048-column chunks, the last column, equal rows, a row
    of -inf, NaN (larger than +inf, as torch.argmax counts it), a vocabulary of one partial chunk."""
    from inferd.layers.triton_fused import argmax_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 128256, generator=g).bfloat16()
    logits[1, 7] = logits[1, 90000] = 50  # a tie across chunks: the first wins
    logits[2, 2047] = logits[2, 2048] = 50  # a tie across a chunk boundary
    logits[3, -1] = 50  # the last entry
    logits[4] = 0  # all equal: index 0
    logits[5] = float("-inf")
    logits[6, 9000] = logits[6, 9001] = float("nan")
    logits[6, 500] = float("inf")  # before the NaN: torch still takes the NaN
    got = argmax_rows(logits)
    assert got.tolist() == logits.argmax(dim=-1).tolist() == [got[0].item(), 7, 2047, 128255, 0, 0, 9000]
    odd = torch.randn(2, 1009, generator=g)  # less than one chunk
    assert argmax_rows(odd).tolist() == odd.argmax(dim=-1).tolist()
