"""Tiny random-weight models in Hugging Face format, built with transformers and tokenizers."""

from __future__ import annotations

import pytest

from inferd.testing import make_model

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}

VARIANTS = {
    "llama-gqa2-untied": dict(arch="llama", heads=4, kv_heads=2),
    "llama-gqa1-tied": dict(arch="llama", heads=4, kv_heads=4, tie=True),
    "llama-gqa4-llama3rope": dict(arch="llama", heads=8, kv_heads=2, hidden=64, rope_scaling=LLAMA3_SCALING),
    "qwen2-gqa2-bias": dict(arch="qwen2", heads=4, kv_heads=2),
    "qwen2-gqa4-tied": dict(arch="qwen2", heads=8, kv_heads=2, tie=True),
}


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def tiny_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model, tokenizer = make_model(path, **VARIANTS[request.param])
    return path, model, tokenizer


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-default")
    make_model(path, **VARIANTS["llama-gqa2-untied"])
    return path
