"""The weight loader's progress bar and load-time log line, for plain and packed models."""

from __future__ import annotations

import logging

from inferd import LLM
from inferd.loader import checkpoint_files, iter_safetensors, load_weights
from inferd.store.source import open_model


def test_weight_bytes_count_the_safetensors_files(llama_dir):
    source = open_model(llama_dir)
    assert source.weight_bytes() == sum(f.stat().st_size for f in checkpoint_files(llama_dir))


def test_progress_bar_counts_every_tensor_byte(llama_dir, capsys):
    llm = LLM(str(llama_dir))
    tensor_bytes = sum(t.numel() * t.element_size() for _, t in iter_safetensors(llama_dir))
    load_weights(llm.engine.runner.model, iter_safetensors(llama_dir), total_bytes=tensor_bytes, progress=True)
    err = capsys.readouterr().err
    assert "loading weights" in err and "100%" in err
    load_weights(llm.engine.runner.model, iter_safetensors(llama_dir), progress=False)
    assert capsys.readouterr().err == ""


def test_load_time_log_line(llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="inferd.runner"):
        LLM(str(llama_dir))
    line = next(r.getMessage() for r in caplog.records if "loaded:" in r.getMessage())
    assert "GB of weights in" in line and "GB/s" in line
