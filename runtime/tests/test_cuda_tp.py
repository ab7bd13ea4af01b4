"""Tensor parallelism on two GPUs with NCCL (CUDA graphs with the all-reduces inside): the greedy
tokens of one GPU, every rank leaves the group on close (NCCL's teardown waits for the graphs that
captured its collectives), a program exits by itself, and a killed worker ends in a clear error.
Skipped without two CUDA devices; imports nothing of the server (the GPU machine has no FastAPI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")

PROMPTS = ["The quick brown fox", "Paged attention keeps the KV cache in blocks. " * 3, "0123 4567 89"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from inferd.testing import make_model

    path = tmp_path_factory.mktemp("llama-tp")
    # head_dim 32: the Triton decode kernel's path, as on real checkpoints.
    make_model(path, arch="llama", hidden=128, heads=4, kv_heads=2, intermediate=256)
    return path


@pytest.fixture
def engines():
    """Every engine a test builds is closed, pass or fail: a TP engine left running holds this
    process's group, and the next test could not start one."""
    built = []

    def make(*args, **kwargs):
        from inferd import LLM

        built.append(LLM(*args, **kwargs))
        return built[-1]

    yield make
    for llm in built:
        llm.engine.close()


def _tokens(llm) -> list[list[int]]:
    from inferd import SamplingParams

    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    return [o.token_ids for o in out]


ARGS = dict(device="cuda", dtype="float32", kv_cache_fraction=0.2, max_model_len=512, cuda_graph_max_batch=8)


def test_two_gpus_give_the_tokens_of_one_and_every_rank_leaves_on_close(model_dir, engines):
    import torch.distributed as dist

    one = engines(str(model_dir), **ARGS)
    expected = _tokens(one)
    one.engine.close()
    del one
    two = engines(str(model_dir), tensor_parallel_size=2, **ARGS)
    assert two.engine.runner.graphs, "decode should replay CUDA graphs holding the all-reduces"
    assert _tokens(two) == expected
    workers = two.engine.runner.workers
    two.engine.close()
    assert [p.exitcode for p in workers] == [0], "a worker had to be killed: it did not leave the group"
    assert not dist.is_initialized()


PROGRAM = """
import sys
from inferd import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], device="cuda", tensor_parallel_size=2, kv_cache_fraction=0.2, max_model_len=512,
              cuda_graph_max_batch=8)
    print("workers", *[p.pid for p in llm.engine.runner.workers], flush=True)
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
"""


def test_a_program_exits_by_itself_without_close(model_dir, tmp_path):
    (tmp_path / "program.py").write_text(PROGRAM)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # 60 s: a hang detector (the old code hung at exit until killed), not a timing assert.
    r = subprocess.run(
        [sys.executable, str(tmp_path / "program.py"), str(model_dir)], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "destroy_process_group() was not called" not in r.stderr, r.stderr[-3000:]
    for line in r.stdout.splitlines():
        if line.startswith("workers"):
            for pid in map(int, line.split()[1:]):
                assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_killed_worker_is_a_clear_error_not_a_hang(model_dir, engines):
    from inferd import SamplingParams
    from inferd.engine.worker import WorkerDiedError

    llm = engines(str(model_dir), device="cuda", tensor_parallel_size=2, kv_cache_fraction=0.2, max_model_len=512)
    worker = llm.engine.runner.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    with pytest.raises(WorkerDiedError, match="worker rank 1"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4))
