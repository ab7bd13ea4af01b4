"""Tensor parallelism on two GPUs with NCCL (CUDA graphs with the all-reduces inside): the greedy
tokens of one GPU, and a killed worker ends in a clear error. Skipped without two CUDA devices;
imports nothing of the server (the GPU machine has no FastAPI)."""

from __future__ import annotations

import os
import signal

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


def _tokens(llm) -> list[list[int]]:
    from inferd import SamplingParams

    out = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    return [o.token_ids for o in out]


def test_two_gpus_give_the_tokens_of_one(model_dir):
    from inferd import LLM

    args = dict(device="cuda", dtype="float32", kv_cache_fraction=0.2, max_model_len=512, cuda_graph_max_batch=8)
    one = LLM(str(model_dir), **args)
    expected = _tokens(one)
    del one
    two = LLM(str(model_dir), tensor_parallel_size=2, **args)
    try:
        assert two.engine.runner.graphs, "decode should replay CUDA graphs holding the all-reduces"
        assert _tokens(two) == expected
    finally:
        two.engine.close()


def test_a_killed_worker_is_a_clear_error_not_a_hang(model_dir):
    from inferd import LLM, SamplingParams
    from inferd.engine.worker import WorkerDiedError

    llm = LLM(str(model_dir), device="cuda", tensor_parallel_size=2, kv_cache_fraction=0.2, max_model_len=512)
    worker = llm.engine.runner.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    with pytest.raises(WorkerDiedError, match="worker rank 1"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4))
