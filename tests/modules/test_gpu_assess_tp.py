"""gpu_assess recommends a tensor-parallel size where one GPU cannot hold the model."""

from __future__ import annotations

import json

from test_gpu_assess import LLAMA_8B, LLAMA_70B, ga

H200 = {"name": "NVIDIA H200", "memory_total_mib": 143771, "compute_capability": "9.0"}


def recommend(config: dict, gpus: int, heads=(64, 8)) -> int | None:
    s = ga.model_shape(config)
    r = ga.assess([H200] * gpus, s["params"], s["kv_bytes_per_token"], "bf16", 4096, 1, 0.95, 2.0)
    return ga.recommend_tensor_parallel([H200] * gpus, r["need_gib"], r["usable_gib"], heads)


def test_a_model_one_gpu_holds_gets_one():
    assert recommend(LLAMA_8B, gpus=2, heads=(32, 8)) == 1


def test_70b_bf16_is_split_over_two_h200s_when_the_host_has_them():
    assert recommend(LLAMA_70B, gpus=1) is None  # 131 GiB of weights: one H200 cannot, and there is no second
    assert recommend(LLAMA_70B, gpus=2) == 2
    assert recommend(LLAMA_70B, gpus=8) == 2  # the smallest size that fits


def test_a_size_must_divide_the_heads():
    assert recommend(LLAMA_70B, gpus=4, heads=(6, 6)) == 2
    assert recommend(LLAMA_70B, gpus=4, heads=(5, 5)) is None  # no size divides 5 heads


def test_heads_come_from_the_model_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA_70B, "num_key_value_heads": None}))
    assert ga._heads(str(path)) == (64, 64)
