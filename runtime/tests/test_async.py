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
