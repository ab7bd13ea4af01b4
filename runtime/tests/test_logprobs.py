"""Logprobs as OpenAI's API shapes them, of the model's raw distribution: each value equals the
log-softmax of transformers' logits for the same tiny model, teacher-forced on the same tokens.
Chat's logprobs/top_logprobs, completions' logprobs: N and echo (prompt logprobs, to score a
text), streaming and not, through the official openai client."""

from __future__ import annotations

import math

import pytest
import torch

from inferd.config import EngineConfig
from inferd.engine.llm_engine import LLMEngine
from inferd.sampling_params import InvalidRequestError, SamplingParams

ATOL = 2e-4  # float32 on both sides; different kernels


@pytest.fixture(scope="module")
def reference(llama_dir):
    """log_softmax of transformers' logits at every position of a token sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def assert_scores(ref: torch.Tensor, pos: int, token: int, logprob: float, top: list[tuple[int, float]], k: int):
    """The logprob of `token` predicted at position `pos`, and the k best there, as the reference."""
    assert logprob == pytest.approx(ref[pos, token].item(), abs=ATOL)
    values, ids = ref[pos].topk(k)
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=ATOL)
    assert {t for t, _ in top} == set(ids.tolist())


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_output_and_top_logprobs_are_the_raw_model_distribution(engine, reference, temperature):
    # Sampling settings do not change the reported values: they are the model's own.
    params = SamplingParams(
        max_tokens=6, temperature=temperature, top_k=5, seed=3, logprobs=True, top_logprobs=4, ignore_eos=True
    )
    out = engine.generate(["the quick brown"], params)[0]
    ids = out.prompt_token_ids + out.token_ids
    ref = reference(ids)
    assert len(out.logprobs) == len(out.top_logprobs) == 6
    for j, token in enumerate(out.token_ids):
        pos = len(out.prompt_token_ids) - 1 + j
        assert_scores(ref, pos, token, out.logprobs[j], out.top_logprobs[j], 4)


def test_prompt_logprobs_score_each_prompt_token_given_the_ones_before(engine, reference):
    params = SamplingParams(max_tokens=1, logprobs=True, top_logprobs=2, prompt_logprobs=True)
    out = engine.generate(["Banks and hospitals run models"], params)[0]
    ref = reference(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None  # nothing precedes the first token
    for p in range(1, len(out.prompt_token_ids)):
        logprob, top = out.prompt_logprobs[p]
        assert_scores(ref, p - 1, out.prompt_token_ids[p], logprob, top, 2)


def test_prompt_logprobs_are_complete_when_the_prompt_is_chunked_or_cached(llama_dir, reference, monkeypatch):
    # Prefill in chunks of 16 tokens (the smallest the config takes: one block), scored in slices
    # of 5; the same prompt twice, so the prefix cache has its blocks the second time.
    monkeypatch.setattr("inferd.engine.model_runner.PROMPT_SCORE_ROWS", 5)
    eng = LLMEngine(EngineConfig(model=str(llama_dir), max_num_batched_tokens=16, max_num_seqs=4))
    prompt = "Paged attention keeps the KV cache in fixed-size blocks. " * 3
    params = SamplingParams(max_tokens=1, logprobs=True, prompt_logprobs=True)
    for _ in range(2):
        out = eng.generate([prompt], params)[0]
        ref = reference(out.prompt_token_ids)
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids) > 32
        for p in range(1, len(out.prompt_token_ids)):
            assert out.prompt_logprobs[p][0] == pytest.approx(ref[p - 1, out.prompt_token_ids[p]].item(), abs=ATOL)


@pytest.mark.parametrize("value", [-1, 21, 2.0, True])
def test_top_logprobs_out_of_range_is_refused_by_name(value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logprobs=True, top_logprobs=value)
    assert e.value.param == "top_logprobs"


# ---- the API -------------------------------------------------------------------------------------
def _chat(client, stream: bool, **kw):
    args = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, **kw)
    if not stream:
        r = client.chat.completions.create(**args)
        return r.choices[0].logprobs.content
    content = []
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            if c.logprobs is not None:
                content.extend(c.logprobs.content)
    return content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_logprobs_and_top_logprobs_through_the_openai_client(client, engine, reference, stream):
    content = _chat(client, stream, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert len(content) == 5
    prompt_ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]), False)
    out_ids = [engine.tokenizer.encode(c.token, False) for c in content]
    # Each entry: the token's text and bytes, its logprob, three alternatives sorted best first.
    for c in content:
        assert c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 3
        assert [a.logprob for a in c.top_logprobs] == sorted((a.logprob for a in c.top_logprobs), reverse=True)
        assert c.top_logprobs[0].logprob >= c.logprob - ATOL  # greedy: the chosen token is the best
    # Teacher-forced: greedy picks the best token, so the reference's argmax chain is the output.
    ids = list(prompt_ids)
    for c in content:
        ref = reference(ids)[-1]
        token = int(ref.argmax())
        assert c.logprob == pytest.approx(ref[token].item(), abs=ATOL)
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(ref.topk(3).values.tolist(), abs=ATOL)
        ids.append(token)
    assert out_ids  # the texts decode to tokens (the alternatives are reported by text too)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_echo_scores_a_text_through_the_openai_client(client, engine, reference, stream):
    text = "The quick brown fox jumps over the lazy dog."
    args = dict(model="tiny", prompt=text, max_tokens=1, temperature=0, logprobs=2, echo=True)
    prompt_ids = engine.tokenize(text)
    if stream:
        tokens, lps, tops, body = [], [], [], ""
        for chunk in client.completions.create(stream=True, **args):
            for c in chunk.choices:
                body += c.text
                if c.logprobs is not None:
                    tokens += c.logprobs.tokens
                    lps += c.logprobs.token_logprobs
                    tops += c.logprobs.top_logprobs
    else:
        r = client.completions.create(**args)
        body, lp = r.choices[0].text, r.choices[0].logprobs
        tokens, lps, tops = lp.tokens, lp.token_logprobs, lp.top_logprobs
        assert lp.text_offset[: len(prompt_ids)] == [sum(len(t) for t in tokens[:i]) for i in range(len(prompt_ids))]
    assert body.startswith(text)
    assert len(tokens) == len(prompt_ids) + 1 and "".join(tokens[1 : len(prompt_ids)]) == text
    assert lps[0] is None and tops[0] is None  # the first prompt token has nothing before it
    ref = reference(prompt_ids)
    for p in range(1, len(prompt_ids)):
        assert lps[p] == pytest.approx(ref[p - 1, prompt_ids[p]].item(), abs=ATOL)
        assert sorted(tops[p].values(), reverse=True) == pytest.approx(ref[p - 1].topk(2).values.tolist(), abs=ATOL)
    # The output token's score follows the prompt's; a text is scored as the sum of its logprobs.
    assert lps[-1] == pytest.approx(ref[-1].max().item(), abs=ATOL) and len(tops[-1]) <= 2
    assert math.isfinite(sum(lps[1:]))


def test_completions_logprobs_n_returns_n_alternatives(client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert all(1 <= len(alts) <= 5 for alts in lp.top_logprobs)  # texts can coincide (a dict)
    assert r.choices[0].text == "".join(lp.tokens) or lp.tokens


def test_echo_without_logprobs_puts_the_prompt_before_the_text(client):
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text.startswith("hello there") and r.choices[0].logprobs is None


def test_openapi_describes_the_new_fields(live_server):
    import httpx

    doc = httpx.get(live_server.url + "/openapi.json", headers=live_server.auth(), timeout=30).json()
    text = str(doc)
    for name in ("top_logprobs", "echo", "response_format", "json_schema"):
        assert name in text, name
