"""Swapping the weights in place (issue 19, engine/weight_swap.py): streams in flight continue on
the new weights, requests arriving during the drain wait and run on them, the prefix cache
forgets the old K/V, a package of another shape or a tampered one is refused with the old
weights serving, and a copy failing part way is rolled back. Then the same through
POST /admin/model/swap under concurrent streaming load.

Steps are gated (`Gate`) so that each test decides where the swap falls, without timing."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading

import httpx
import pytest

from inferd import LLM, SamplingParams
from inferd.engine import weight_swap
from inferd.engine.async_engine import AsyncLLMEngine, WeightSwapError, WeightSwapRolledBack
from inferd.testing import make_model

SHAPE = dict(arch="llama", heads=4, kv_heads=2)
PROMPTS = [[1, 5, 9, 13, 17], [2, 7, 11]]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A model store: `a` serves first, `b` has the same shape and other weights, `small` another shape,
    `b-packed` is b packed (unsigned, unencrypted), `b-tampered` that package with one byte changed."""
    root = tmp_path_factory.mktemp("store")
    make_model(root / "a", **SHAPE, seed=1)
    make_model(root / "b", **SHAPE, seed=2)
    make_model(root / "small", **SHAPE, hidden=32, seed=3)
    r = subprocess.run(
        [sys.executable, "-m", "inferd.cli", "pack", str(root / "b"), str(root / "b-packed"), "--chunk-kib", "16"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    shutil.copytree(root / "b-packed", root / "b-tampered")
    data = [p for p in (root / "b-tampered").rglob("*") if p.is_file() and "data" in p.parts]
    chunk = max(data, key=lambda p: p.stat().st_size)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    return root


def llm(path) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(store):
    """Direct generation with each model: what a stream must equal before and after the swap."""
    return {name: llm(store / name) for name in ("a", "b")}


class Gate:
    """Blocks the engine thread before its next step from `close()` (or from the first step
    where `close_when(engine)` holds) until `open()`."""

    def __init__(self, engine, close_when=None):
        self.closed, self.opened = threading.Event(), threading.Event()
        step = engine.step

        def gated():
            if close_when is not None and close_when(engine):
                self.closed.set()
            if self.closed.is_set():
                assert self.opened.wait(60), "the gate was never opened"
            return step()

        engine.step = gated

    def close(self):
        self.closed.set()

    def open(self, *_):
        self.opened.set()


@pytest.fixture
def serving(store):
    aengine = AsyncLLMEngine(llm(store / "a").engine)
    yield aengine
    aengine.shutdown()


async def stream(aengine, prompt, n, tokens: list):
    async for out in aengine.generate(prompt, greedy(n)):
        tokens.extend(out.new_token_ids)


def continued_on(tokens, prompt, reference) -> int:
    """Where `tokens` went from model a's greedy output to model b's continuation of it; fails
    when no such point exists."""
    a = reference["a"].generate([prompt], greedy(len(tokens)))[0].token_ids
    m = next((i for i, (x, y) in enumerate(zip(tokens, a)) if x != y), len(tokens))
    for k in range(m, 0, -1):
        b = reference["b"].generate([prompt + tokens[:k]], greedy(len(tokens) - k))[0].token_ids if k < len(tokens) else []
        if tokens[k:] == b:
            return k
    raise AssertionError(f"{tokens} is not a's output continued by b's (a: {a})")


def test_streams_in_flight_continue_on_the_new_weights(serving, store, reference):
    gate = Gate(serving.engine)
    n = 30

    async def main():
        tokens = [[] for _ in PROMPTS]
        tasks = [asyncio.create_task(stream(serving, p, n, t)) for p, t in zip(PROMPTS, tokens)]
        while min(map(len, tokens)) < 3:
            await asyncio.sleep(0.01)
        gate.close()
        report = await asyncio.to_thread(serving.swap_weights, str(store / "b"), 0.0, None, gate.open)
        await asyncio.gather(*tasks)
        return tokens, report

    tokens, report = asyncio.run(main())
    assert report.preempted == len(PROMPTS) and report.token_gap_s is not None and report.paused_s >= 0
    assert report.new_model == str(store / "b") and report.old_model == str(store / "a")
    for prompt, t in zip(PROMPTS, tokens):
        assert len(t) == n, "every stream completes"
        k = continued_on(t, prompt, reference)
        assert 3 <= k < n, "tokens before the swap came from a, those after from b"


def test_drain_finishes_running_requests_and_new_ones_wait_for_the_new_weights(serving, store, reference):
    bm = serving.engine.block_manager
    long_prompt = list(range(3, 3 + 3 * bm.block_size + 2))
    gate = Gate(serving.engine)

    async def main():
        await asyncio.gather(stream(serving, long_prompt, 2, []))  # cached on a's weights
        tokens = [[] for _ in PROMPTS]
        tasks = [asyncio.create_task(stream(serving, p, 6, t)) for p, t in zip(PROMPTS, tokens)]
        while min(map(len, tokens)) < 1:
            await asyncio.sleep(0.01)
        gate.close()
        late: list = []

        def staged(_):  # a request arriving during the swap: it waits, then runs on b
            tasks.append(asyncio.run_coroutine_threadsafe(stream(serving, [4, 8, 15], 5, late), loop))
            gate.open()

        loop = asyncio.get_running_loop()
        report = await asyncio.to_thread(serving.swap_weights, str(store / "b"), 60.0, None, staged)
        await asyncio.gather(*tasks[: len(PROMPTS)], asyncio.wrap_future(tasks[-1]))
        after = [o async for o in serving.generate(long_prompt, greedy(4))][-1]
        return tokens, late, report, after

    tokens, late, report, after = asyncio.run(main())
    assert report.preempted == 0 and report.token_gap_s is None
    for prompt, t in zip(PROMPTS, tokens):
        assert t == reference["a"].generate([prompt], greedy(6))[0].token_ids, "drained on the old weights"
    assert late == reference["b"].generate([[4, 8, 15]], greedy(5))[0].token_ids
    assert after.num_cached_tokens == 0, "no K/V of the old weights is reused"
    assert after.token_ids == reference["b"].generate([long_prompt], greedy(4))[0].token_ids


def serves_a(aengine, reference) -> bool:
    async def main():
        return [o async for o in aengine.generate(PROMPTS[0], greedy(8))][-1].token_ids

    return asyncio.run(main()) == reference["a"].generate([PROMPTS[0]], greedy(8))[0].token_ids


@pytest.mark.parametrize(
    ("name", "needle"),
    [("small", "hidden_size"), ("b-tampered", "does not match the manifest"), ("missing", "not a model directory")],
)
def test_a_package_that_cannot_swap_is_refused_and_the_old_weights_serve(serving, store, reference, name, needle):
    with pytest.raises((WeightSwapError, ValueError)) as e:
        serving.swap_weights(str(store / name))
    assert needle in str(e.value).lower()
    assert serving.engine.config.model == str(store / "a")
    assert serves_a(serving, reference)


def fail_copy(monkeypatch, at: int) -> list:
    """The swap's tensor copy raises on its at-th call; returns the list of calls, one entry each."""
    calls = []
    copy = weight_swap.copy_tensor

    def failing(dst, src):
        calls.append(1)
        if len(calls) == at:
            raise RuntimeError("injected copy failure")
        copy(dst, src)

    monkeypatch.setattr(weight_swap, "copy_tensor", failing)
    return calls


def test_a_copy_failing_part_way_is_rolled_back(serving, store, reference, monkeypatch):
    calls = fail_copy(monkeypatch, at=3)
    with pytest.raises(WeightSwapRolledBack, match="previous weights were restored"):
        serving.swap_weights(str(store / "b"))
    assert len(calls) > 3, "the snapshot was copied back"
    assert serving.engine.config.model == str(store / "a")
    assert serves_a(serving, reference)


def test_a_packed_model_swaps_in(serving, store, reference):
    serving.swap_weights(str(store / "b-packed"))

    async def main():
        return [o async for o in serving.generate(PROMPTS[1], greedy(6))][-1].token_ids

    assert asyncio.run(main()) == reference["b"].generate([PROMPTS[1]], greedy(6))[0].token_ids


def test_fp8_weights_and_scales_are_recomputed(store):
    ref_b = LLM(str(store / "b"), device="cpu", dtype="float32", quantization="fp8")
    aengine = AsyncLLMEngine(LLM(str(store / "a"), device="cpu", dtype="float32", quantization="fp8").engine)
    try:
        aengine.swap_weights(str(store / "b"))

        async def main():
            return [o async for o in aengine.generate(PROMPTS[0], greedy(6))][-1].token_ids

        assert asyncio.run(main()) == ref_b.generate([PROMPTS[0]], greedy(6))[0].token_ids
    finally:
        aengine.shutdown()


# ---- through the HTTP API -----------------------------------------------------------------------
@pytest.fixture
def live(store, tmp_path):
    from conftest import LiveServer

    server = LiveServer(store / "a", tmp_path / "data")
    yield server
    server.stop()


def http_stream(server, prompt: str, out: list) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.auth(), timeout=120) as r:
        if r.status_code != 200:
            out.append({"error": r.read().decode()})
            return
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.extend(json.loads(line[6:])["choices"])


def test_swap_through_the_admin_route_under_streaming_load(live, store, reference):
    admin = live.auth("adam")
    before = httpx.get(live.url + "/health").json()["model_version"]

    def mid_way(engine):  # every stream has tokens and far more to come
        seqs = list(engine.sequences.values())
        return len(seqs) == 4 and all(s.num_output_tokens >= 2 for s in seqs)

    gate = Gate(live.app.state.inferd.engine.engine, mid_way)
    outs = [[] for _ in range(4)]
    threads = [threading.Thread(target=http_stream, args=(live, f"The quick brown fox {i}", o)) for i, o in enumerate(outs)]
    for t in threads:
        t.start()
    assert gate.closed.wait(60), "the streams never all ran"
    aengine = live.app.state.inferd.engine

    def open_when_queued():  # staging runs while the engine is held: the streams are mid-way at the swap
        while aengine._swap is None and not gate.opened.is_set():
            threading.Event().wait(0.01)
        gate.open()

    opener = threading.Thread(target=open_when_queued)
    opener.start()
    r = httpx.post(live.url + "/admin/model/swap", json={"model": "b", "drain_timeout_s": 0}, headers=admin, timeout=120)
    gate.open()
    for t in [*threads, opener]:
        t.join(120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["old"]["path"] == str(store / "a") and body["new"]["path"] == str(store / "b")
    assert body["pause_s"] >= 0 and body["staging_s"] >= 0
    assert body["preempted"] == 4 and body["token_gap_s"] is not None, "the streams were in flight at the swap"
    for o in outs:
        assert o[-1]["finish_reason"] in ("length", "stop"), "every stream completes"
    after = httpx.get(live.url + "/health").json()["model_version"]
    models = httpx.get(live.url + "/v1/models", headers=live.auth()).json()["data"][0]
    assert models["model_version"] == after == body["new"]["model_version"]
    assert after != before or before is None
    text = httpx.post(
        live.url + "/v1/completions",
        json={"model": "tiny", "prompt": "Paged attention", "max_tokens": 6, "temperature": 0},
        headers=live.auth(),
    ).json()["choices"][0]["text"]
    assert text == reference["b"].generate(["Paged attention"], SamplingParams(max_tokens=6, temperature=0.0))[0].text
    metrics = httpx.get(live.url + "/metrics", headers=admin).text
    assert 'inferd_model_swaps_total{result="ok"} 1.0' in metrics and "inferd_model_swap_pause_seconds" in metrics
    logs = httpx.get(live.url + "/admin/logs", headers=live.auth("olivia")).json()
    swaps = [rec for rec in logs["records"] if rec.get("route") == "/admin/model/swap"]
    assert swaps and swaps[0]["change"]["swap"]["new"]["path"] == str(store / "b")


@pytest.mark.parametrize(
    ("model", "status", "needle"),
    [
        ("small", 400, "hidden_size"),
        ("b-tampered", 400, "does not match the manifest"),
        ("../a", 400, "under the model store"),
        ("nope", 400, "does not exist"),
        ("b\u0000", 400, "cannot be opened"),
    ],
)
def test_the_admin_route_refuses_a_bad_package_and_the_old_one_serves(live, model, status, needle):
    before = httpx.get(live.url + "/health").json()
    r = httpx.post(live.url + "/admin/model/swap", json={"model": model}, headers=live.auth("adam"), timeout=120)
    assert r.status_code == status and needle in r.text
    assert httpx.get(live.url + "/health").json() == before
    user = httpx.post(live.url + "/admin/model/swap", json={"model": "b"}, headers=live.auth("alice"))
    assert user.status_code == 403, "admin only"


def test_the_admin_route_reports_a_rolled_back_copy(live, monkeypatch):
    fail_copy(monkeypatch, at=2)
    before = httpx.get(live.url + "/health").json()
    r = httpx.post(live.url + "/admin/model/swap", json={"model": "b"}, headers=live.auth("adam"), timeout=120)
    assert r.status_code == 500 and r.json()["error"]["code"] == "swap_rolled_back"
    assert httpx.get(live.url + "/health").json() == before


def test_a_tensor_parallel_engine_refuses_an_in_place_swap_and_keeps_serving(store):
    """The copy reaches rank 0's shard only: refused before anything is staged."""
    two = LLM(str(store / "a"), device="cpu", dtype="float32", tensor_parallel_size=2)
    try:
        before = two.generate(["one two"], greedy(3))[0].token_ids
        with pytest.raises(WeightSwapError, match="tensor_parallel_size 2"):
            weight_swap.stage(two.engine, store / "b")
        assert two.generate(["one two"], greedy(3))[0].token_ids == before
    finally:
        two.engine.close()
