"""Greedy tokens and prefill logits equal transformers on the same random weights."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.testing import hf_greedy, prefill_logits

PROMPTS = [
    "The quick brown fox",
    "Banks and hospitals run DeepSeek models on their own GPU servers. Paged attention keeps the KV cache",
    "0123",
    "Continuous batching lets requests join and leave between steps. " * 3,
]


@pytest.fixture(scope="module")
def engine_for(tiny_model):
    path, model, tokenizer = tiny_model
    llm = LLM(str(path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 25)
    return llm, model, tokenizer


def test_prefill_logits_match_transformers(engine_for):
    llm, model, tokenizer = engine_for
    ids = tokenizer(PROMPTS[1]).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = prefill_logits(llm, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_equal_transformers_generate(engine_for):
    llm, model, tokenizer = engine_for
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt).input_ids
        assert out.prompt_token_ids == ids, "our tokenizer disagrees with transformers'"
        assert out.token_ids == hf_greedy(model, ids, 64), f"greedy tokens differ for {prompt!r}"
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
