"""The streaming interface: tokens arrive as they are made, concurrent streams are independent,
leaving a stream early aborts the request, bad input fails only its own request."""

from __future__ import annotations

import asyncio

import pytest

from inferd import LLM, SamplingParams
from inferd.engine.async_engine import AsyncLLMEngine

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(llama_dir):
    llm = LLM(str(llama_dir), device="cpu", dtype="float32")
    expected = {p: llm.generate([p], GREEDY)[0] for p in ("The quick brown fox", "Paged attention")}
    aengine = AsyncLLMEngine(llm.engine)
    yield aengine, expected
    aengine.shutdown()


async def collect(aengine, prompt, params=GREEDY):
    outs = [o async for o in aengine.generate(prompt, params)]
    return outs


def test_concurrent_streams_match_offline_generation(engines):
    aengine, expected = engines

    async def main():
        return await asyncio.gather(*(collect(aengine, p) for p in expected))

    results = asyncio.run(main())
    for exp, outs in zip(expected.values(), results):
        assert len(outs) == 20, "one output per generated token"
        assert [o.new_token_ids[0] for o in outs] == exp.token_ids
        assert "".join(o.new_text for o in outs) == exp.text
        assert outs[-1].finished and outs[-1].token_ids == exp.token_ids


def test_leaving_a_stream_early_aborts_the_request(engines):
    aengine, _ = engines
    bm = aengine.engine.block_manager
    free_before = bm.num_free

    async def main():
        got = 0
        async for _ in aengine.generate("The quick brown fox", SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)):
            got += 1
            if got == 3:
                break
        for _ in range(100):  # the engine thread frees the blocks at its next step
            if not aengine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        return got

    assert asyncio.run(main()) == 3
    assert not aengine.engine.has_unfinished_requests()
    assert bm.num_free == free_before


def test_bad_request_fails_alone(engines):
    aengine, expected = engines

    async def main():
        bad = collect(aengine, [10**9])
        good = collect(aengine, "Paged attention")
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and "token ids" in str(bad)
    assert [o.new_token_ids[0] for o in good] == expected["Paged attention"].token_ids


# ---- the engine's face to the server -----------------------------------------------------------
def test_events_while_running_and_the_final_output_are_different_types(engines):
    from inferd.outputs import RequestOutput, TokenEvent

    aengine, expected = engines
    outs = asyncio.run(collect(aengine, "The quick brown fox"))
    assert all(type(o) is TokenEvent for o in outs[:-1]) and type(outs[-1]) is RequestOutput
    assert not hasattr(outs[0], "token_ids"), "an unfinished event has no (empty) totals to misread"
    assert outs[-1].text == expected["The quick brown fox"].text


def test_the_face_validates_a_prompt_and_names_the_field(engines):
    from inferd.sampling_params import InvalidRequestError

    aengine, _ = engines
    ctx = aengine.max_model_len
    assert aengine.check_prompt([1, 2, 3]) == ctx - 3
    cases = [([], None, "prompt"), ([10**6], None, "prompt"), ([1] * ctx, None, "prompt"), ([1, 2], ctx, "max_tokens")]
    for ids, max_tokens, param in cases:
        with pytest.raises(InvalidRequestError) as e:
            aengine.check_prompt(ids, max_tokens)
        assert e.value.param == param, (ids[:3], max_tokens, str(e.value))


def test_the_face_reports_stats_and_speaks_the_tokenizer(engines):
    from inferd.outputs import EngineStats

    aengine, _ = engines
    stats = aengine.stats()
    assert isinstance(stats, EngineStats) and stats.running == 0 and stats.waiting == 0 and 0 <= stats.kv_cache_usage < 1
    ids = aengine.encode("The quick brown fox", add_special_tokens=False)
    assert len(aengine.token_texts(ids)) == len(ids) and "".join(aengine.token_texts(ids)) == "The quick brown fox"
    assert aengine.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|assistant|>")


def test_sampling_params_errors_name_the_field():
    from inferd.sampling_params import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(stop=["x"] * 100)
    assert e.value.param == "stop"


def test_held_back_text_is_flushed_at_the_end_as_the_full_decode_renders_it(llama_dir):
    from inferd.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer(llama_dir)
    ids = tok.encode("é", add_special_tokens=False)
    assert len(ids) == 2, "the test needs a character split over two byte tokens"
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[0]) == "", "half a UTF-8 sequence is held back"
    assert detok.flush() == tok.decode(ids[:1]) and detok.text == tok.decode(ids[:1])
