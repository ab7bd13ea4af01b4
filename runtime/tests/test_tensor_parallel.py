"""Tensor parallelism on the CPU: two processes on gloo give the greedy tokens one process gives
(Llama and Qwen2, a batch, a prefix-cache hit), a killed worker ends in a clear error, and sizes
the model cannot be split into are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig
from inferd.engine.worker import WorkerDiedError
from inferd.layers import distributed
from inferd.layers.embed_head import VocabEmbedding
from inferd.layers.linear import Linear, MergedLinear, QKVLinear
from inferd.testing import make_model

SHARED = "Paged attention keeps the KV cache in blocks; a prefix hit reuses them. "
PROMPTS = ["The quick brown fox", SHARED + "First", "0123 4567 89"]
MODELS = {
    "llama": dict(arch="llama", heads=4, kv_heads=2),
    # Tied, with a vocabulary the two ranks split unevenly (the last rank's slice is padded).
    "llama-tied-odd-vocab": dict(arch="llama", heads=4, kv_heads=4, tie=True, vocab_size=509),
    "qwen2": dict(arch="qwen2", heads=4, kv_heads=2),
}
ARGS = dict(device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22, block_size=4)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_model(path, **MODELS[request.param])
    return path


def run(llm: LLM) -> list[tuple[list[int], int]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    batch = llm.generate(PROMPTS, params)
    hit = llm.generate([SHARED + "Second prompt"], params)  # SHARED's blocks are cached by now
    return [(o.token_ids, o.num_cached_tokens) for o in [*batch, *hit]]


def test_two_ranks_give_the_tokens_of_one(model_dir):
    one = LLM(str(model_dir), **ARGS)
    expected = run(one)
    two = LLM(str(model_dir), tensor_parallel_size=2, **ARGS)
    try:
        assert run(two) == expected
        assert expected[-1][1] > 0, "the last prompt should hit the prefix cache"
    finally:
        two.engine.close()


def test_fp8_runs_per_rank(tmp_path):
    make_model(tmp_path, **MODELS["llama"], hidden=64, intermediate=128)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, quantization="fp8", **ARGS)
    try:
        out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert [len(o.token_ids) for o in out] == [4] * len(PROMPTS)
    finally:
        llm.engine.close()


def test_a_killed_worker_is_a_clear_error(tmp_path):
    make_model(tmp_path, **MODELS["llama"])
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **ARGS)
    try:
        worker = llm.engine.runner.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 .* exited with code -9"):
            llm.generate(PROMPTS, SamplingParams(max_tokens=4))
    finally:
        llm.engine.close()


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_a_size_below_one_or_not_an_integer_is_refused(size):
    with pytest.raises(ValueError, match="tensor_parallel_size must be"):
        EngineConfig(model="m", tensor_parallel_size=size)


def test_a_size_that_does_not_divide_the_heads_is_refused(tmp_path):
    make_model(tmp_path, **MODELS["llama"])
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide the model's num_attention_heads \(4\)"):
        LLM(str(tmp_path), tensor_parallel_size=3, **ARGS)
    # More ranks than KV heads: KV heads are split, never replicated.
    with pytest.raises(ValueError, match=r"does not divide the model's num_key_value_heads \(2\)"):
        LLM(str(tmp_path), tensor_parallel_size=4, **ARGS)


@pytest.fixture
def rank1_of_2(monkeypatch):
    monkeypatch.setattr(distributed, "_rank", 1)
    monkeypatch.setattr(distributed, "_size", 2)


def test_layers_load_their_rank_s_slice(rank1_of_2):
    qkv = QKVLinear(8, head_dim=2, num_heads=4, num_kv_heads=2, parallel="column")
    q, k, v = (torch.arange(n * 8, dtype=torch.float32).reshape(n, 8) for n in (8, 4, 4))
    for name, t in zip("qkv", (q, k, v)):
        qkv.weight.weight_loader(qkv.weight, t, name)
    assert torch.equal(qkv.weight, torch.cat([q[4:], k[2:], v[2:]]))
    gate_up = MergedLinear(8, [6, 6], parallel="column")
    gate_up.weight.weight_loader(gate_up.weight, torch.ones(6, 8), 0)
    gate_up.weight.weight_loader(gate_up.weight, torch.arange(48.0).reshape(6, 8), 1)
    assert torch.equal(gate_up.weight[3:], torch.arange(48.0).reshape(6, 8)[3:])
    down = Linear(6, 8, bias=True, parallel="row")
    w = torch.arange(48.0).reshape(8, 6)
    down.weight.weight_loader(down.weight, w)
    down.bias.weight_loader(down.bias, torch.ones(8))
    assert torch.equal(down.weight, w[:, 3:])
    assert torch.equal(down.bias, torch.zeros(8)), "only rank 0 adds the bias of a row-parallel layer"
    embed = VocabEmbedding(5, 2)
    embed.weight.weight_loader(embed.weight, torch.arange(10.0).reshape(5, 2))
    assert torch.equal(embed.weight, torch.tensor([[6.0, 7.0], [8.0, 9.0], [0.0, 0.0]]))


def test_a_layer_that_asks_for_no_sharding_stays_whole(rank1_of_2):
    layer = MergedLinear(8, [4, 4])
    assert layer.weight.shape == (8, 8)
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size"):
        Linear(8, 5, parallel="column")


def test_the_server_config_takes_the_size_as_a_flat_key_and_names_it_when_bad(tmp_path):
    from inferd.server.config import ServerConfig, load_config

    assert ServerConfig(model="m", tensor_parallel_size=2).engine.tensor_parallel_size == 2
    path = tmp_path / "config.yaml"
    path.write_text("model: m\ntensor_parallel_size: 0\n")
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be >= 1"):
        load_config(str(path))


def test_serve_takes_the_size_from_its_flag_and_refuses_a_bad_one(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "config.yaml"
    path.write_text(f"model: m\ndata_dir: {tmp_path}\n")
    r = subprocess.run(
        [sys.executable, "-m", "inferd.cli", "serve", "--config", str(path), "--tensor-parallel-size", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "tensor_parallel_size must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_a_killed_worker_turns_the_server_not_ready_and_asks_to_exit(tmp_path):
    import asyncio

    from inferd.engine.async_engine import EngineDeadError
    from inferd.server.config import ServerConfig
    from inferd.server.state import ServerState

    make_model(tmp_path / "model", **MODELS["llama"])
    fatal = []
    cfg = ServerConfig(
        model=str(tmp_path / "model"),
        data_dir=str(tmp_path / "data"),
        max_model_len=64,
        model_allow_unsigned=True,
        tensor_parallel_size=2,
    )
    state = ServerState(cfg, on_fatal=fatal.append)
    state.load_model(at_start=True)
    runner = state.engine.engine.runner
    try:
        assert state.ready
        os.kill(runner.workers[0].pid, signal.SIGKILL)
        runner.workers[0].join()

        async def one_request():
            async for _ in state.engine.generate([1, 2, 3], SamplingParams(max_tokens=2)):
                pass

        with pytest.raises(EngineDeadError, match=r"worker rank 1 .* exited with code -9"):
            asyncio.run(asyncio.wait_for(one_request(), 30))
        state.engine._thread.join(10)
        assert not state.ready and fatal and "worker rank 1" in fatal[0]
    finally:
        state.close()
        runner.close()


def test_a_second_group_in_one_process_is_refused_until_the_first_closes(tmp_path):
    make_model(tmp_path, **MODELS["llama"])
    first = LLM(str(tmp_path), tensor_parallel_size=2, **ARGS)
    try:
        with pytest.raises(RuntimeError, match="already running in this process: close it"):
            LLM(str(tmp_path), tensor_parallel_size=2, **ARGS)
    finally:
        first.engine.close()
    again = LLM(str(tmp_path), tensor_parallel_size=2, **ARGS)
    again.engine.close()
    again.engine.close()  # a second close is a no-op


def test_prompt_logprobs_and_top_logprobs_match_one_rank(tmp_path):
    make_model(tmp_path, **MODELS["qwen2"])
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=2, prompt_logprobs=True)
    prompts = [SHARED * 2, "0123 4567 89"]
    one = LLM(str(tmp_path), **{**ARGS, "max_num_batched_tokens": 16})  # chunked prefill
    expected = one.generate(prompts, params)
    two = LLM(str(tmp_path), tensor_parallel_size=2, **{**ARGS, "max_num_batched_tokens": 16})
    try:
        got = two.generate(prompts, params)
    finally:
        two.engine.close()
    assert len(got[0].prompt_logprobs) > 16  # scored across prefill chunks
    for a, b in zip(got, expected):
        assert a.token_ids == b.token_ids
        assert a.prompt_logprobs is not None and len(a.prompt_logprobs) == len(b.prompt_logprobs)
        assert a.prompt_logprobs[0] is None
        for (lp, alts), (lp1, alts1) in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert lp == pytest.approx(lp1, abs=1e-4)
            assert [t for t, _ in alts] == [t for t, _ in alts1]


# A program that builds a TP=2 engine, generates and ends: by itself (the atexit hook), after
# close() (twice), or with rank 0 vanishing (os._exit, no hook runs).
PROGRAM = """
import os, sys
from inferd import LLM, SamplingParams

if __name__ == "__main__":
    model, ending = sys.argv[1], sys.argv[2]
    llm = LLM(model, tensor_parallel_size=2, device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22, block_size=4)
    print("workers", *[p.pid for p in llm.engine.runner.workers], flush=True)
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    if ending == "close":
        llm.engine.close()
        llm.engine.close()
    elif ending == "vanish":
        os._exit(0)
"""
HANG_LIMIT_S = 120  # a hang detector (a spawned worker imports torch again), not a timing assert


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # an orphan nobody reaped has exited all the same


@pytest.mark.parametrize("ending", ["end", "close", "vanish"])
def test_a_program_with_spawned_workers_exits_and_leaves_no_worker(tmp_path, ending):
    """The CUDA path's start method (spawn): the program exits 0 with or without close(), and no
    worker outlives rank 0, even one that vanished without running its exit hooks."""
    make_model(tmp_path / "model", **MODELS["llama"])
    (tmp_path / "program.py").write_text(PROGRAM)
    runtime = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "INFERD_TP_START_METHOD": "spawn", "PYTHONPATH": runtime}
    r = subprocess.run(
        [sys.executable, str(tmp_path / "program.py"), str(tmp_path / "model"), ending],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_LIMIT_S,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    pids = [int(p) for line in r.stdout.splitlines() if line.startswith("workers") for p in line.split()[1:]]
    assert len(pids) == 1
    deadline = time.monotonic() + HANG_LIMIT_S  # a vanished rank 0's workers notice within seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), f"worker(s) {pids} outlived rank 0"
    if ending != "vanish":  # a vanished rank 0 leaves its semaphores to the resource tracker
        assert "Traceback" not in r.stderr and "leaked" not in r.stderr, r.stderr[-3000:]


def test_the_start_method_is_spawn_on_cuda_and_a_bad_override_is_named(monkeypatch):
    from inferd.engine.worker import start_method

    monkeypatch.setenv("INFERD_TP_START_METHOD", "fork")
    assert start_method("cuda:0") == "spawn"
    assert start_method("cpu") == "fork"
    monkeypatch.setenv("INFERD_TP_START_METHOD", "forkserver")
    with pytest.raises(ValueError, match="INFERD_TP_START_METHOD='forkserver': use 'fork' or 'spawn'"):
        start_method("cpu")


class _Graph:
    def __init__(self, events):
        self.events = events

    def reset(self):
        self.events.append("graph reset")


def _bare_runner(tmp_path, workers=(), runner=None):
    from inferd.engine.worker import TensorParallelRunner

    tp = object.__new__(TensorParallelRunner)
    tp.__dict__.update(_closed=False, conns=[], workers=list(workers), _dir=str(tmp_path), join_timeout_s=30.0)
    if runner is not None:
        tp.runner = runner
    return tp


def test_close_drops_the_cuda_graphs_before_leaving_the_group_and_once(tmp_path, monkeypatch):
    """NCCL waits, forever, for the CUDA graphs that captured its collectives before it tears a
    communicator down: a rank must destroy them first (the TP=2 hang at exit on H200)."""
    from types import SimpleNamespace

    from inferd.engine import worker

    events = []
    runner = SimpleNamespace(device="cuda:0", graphs={1: _Graph(events), 2: _Graph(events)}, graph_outputs={1: 0, 2: 0})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    monkeypatch.setattr(worker, "destroy_tensor_parallel", lambda abort=False: events.append(f"leave abort={abort}"))
    tp = _bare_runner(tmp_path, runner=runner)
    tp.close()
    tp.close()
    assert events == ["synchronize", "graph reset", "graph reset", "leave abort=False"]
    assert runner.graphs == {} and runner.graph_outputs == {}


def _sleep_forever():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


def test_close_kills_a_worker_that_does_not_stop(tmp_path, monkeypatch):
    import multiprocessing as mp

    from inferd.engine import worker

    monkeypatch.setattr(worker, "destroy_tensor_parallel", lambda abort=False: None)
    stuck = mp.get_context("fork").Process(target=_sleep_forever, daemon=True)
    stuck.start()
    tp = _bare_runner(tmp_path, workers=[stuck])
    tp.join_timeout_s = 0.5
    tp.close()
    assert not stuck.is_alive() and stuck.exitcode == -signal.SIGKILL
