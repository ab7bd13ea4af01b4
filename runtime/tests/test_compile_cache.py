"""The persistent compile cache (issue 25 part 7): one directory per model shape, settings and
versions, pointed at before anything compiles, reused by the next start, never trusted when its
files do not match what the last completed start sealed. (On the CPU nothing is compiled: the
kernels' own caching is measured on the GPU by runtime/bench/bench_startup.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from inferd import LLM
from inferd.engine import compile_cache as cc

ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.fixture(autouse=True)
def restore_env(monkeypatch):
    for name in ENV:  # recorded now, put back after the test
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


def start(model_dir, root, **kw) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", max_model_len=256, compile_cache_dir=str(root), **kw)


def only_key_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if ".untrusted-" not in p.name]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_the_caches_point_into_a_keyed_directory_that_the_next_start_reuses(llama_dir, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    llm = start(llama_dir, tmp_path)
    d = only_key_dir(tmp_path)
    assert llm.engine.runner.compile_cache.directory == d
    assert cache_dir() == str(d / "inductor") and triton_cache_dir(0) == str(d / "triton")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert json.loads((d / "key.json").read_text())["settings"]["dtype"] == "float32"
    # What a compile leaves behind, then a completed start seals it...
    kernel = d / "triton" / "abc" / "kernel.cubin"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"\x7fELF compiled")
    llm.engine.runner.compile_cache.seal()
    assert "triton/abc/kernel.cubin" in json.loads((d / "manifest.json").read_text())["files"]
    # ...and the next start with the same settings finds it.
    start(llama_dir, tmp_path)
    assert only_key_dir(tmp_path) == d and kernel.read_bytes() == b"\x7fELF compiled"


def test_the_key_changes_with_shape_settings_and_versions(llama_dir, tmp_path, monkeypatch):
    from inferd.config import EngineConfig
    from inferd.models.config import parse_model_config

    model_cfg = parse_model_config(json.loads((llama_dir / "config.json").read_text()))
    base = EngineConfig(model="m", compile_cache_dir="x")

    def key(config=base, mc=model_cfg):
        return cc.cache_key(cc.cache_key_fields(config, mc))

    assert key() == key()
    assert key(EngineConfig(model="m", dtype="bfloat16")) != key()
    assert key(EngineConfig(model="m", kv_cache_dtype="fp8")) != key()
    assert key(EngineConfig(model="m", quantization="fp8")) != key()
    assert key(EngineConfig(model="m", max_num_seqs=64)) != key()
    bigger = parse_model_config(json.loads((llama_dir / "config.json").read_text()) | {"hidden_size": 128})
    assert key(mc=bigger) != key()
    assert cc.cache_key(cc.cache_key_fields(base, model_cfg, rank=1)) != key()
    original = key()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert key() != original
    monkeypatch.undo()
    monkeypatch.setattr(cc.inferd, "__version__", "9.9.9")
    assert key() != original


def test_a_corrupt_file_is_removed_the_rest_kept_and_the_engine_still_starts(llama_dir, tmp_path):
    llm = start(llama_dir, tmp_path)
    d = only_key_dir(tmp_path)
    corrupt, good, gone = (d / "inductor" / "fxgraph" / "entry", d / "triton" / "k" / "kernel.cubin", d / "inductor" / "lock")
    for path in (corrupt, good, gone):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"compiled")
    llm.engine.runner.compile_cache.seal()
    corrupt.write_bytes(b"garbage of the same kind")
    gone.unlink()  # torch removing a file of its own is a miss, not corruption
    llm = start(llama_dir, tmp_path)
    assert llm.generate([[1, 2, 3]])[0].token_ids
    assert not corrupt.exists(), "a file that does not match its manifest was kept"
    assert good.read_bytes() == b"compiled"
    assert only_key_dir(tmp_path) == d and not [p for p in tmp_path.iterdir() if ".untrusted-" in p.name]


def test_an_unreadable_manifest_moves_the_whole_cache_aside(llama_dir, tmp_path):
    start(llama_dir, tmp_path)
    d = only_key_dir(tmp_path)
    kernel = d / "triton" / "k" / "kernel.cubin"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"compiled")
    (d / "manifest.json").write_bytes(os.urandom(64))
    llm = start(llama_dir, tmp_path)
    assert llm.generate([[1, 2, 3]])[0].token_ids
    assert not kernel.exists() and (d / "manifest.json").exists()
    aside = [p for p in tmp_path.iterdir() if ".untrusted-" in p.name]
    assert len(aside) == 1 and (aside[0] / "triton" / "k" / "kernel.cubin").exists()


@pytest.mark.parametrize("garbage", ["manifest", "unlisted", "no-manifest"])
def test_garbage_in_the_cache_directory_never_stops_a_start(llama_dir, tmp_path, garbage):
    start(llama_dir, tmp_path)
    d = only_key_dir(tmp_path)
    stray = d / "triton" / "zz" / "stray.json"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(os.urandom(64))
    if garbage == "manifest":
        (d / "manifest.json").write_bytes(os.urandom(64))
    elif garbage == "no-manifest":
        (d / "manifest.json").unlink()
    llm = start(llama_dir, tmp_path)
    assert llm.generate([[1, 2, 3]])[0].token_ids
    assert not stray.exists()
    assert only_key_dir(tmp_path) == d and (d / "manifest.json").exists()


def test_an_unusable_cache_directory_starts_without_a_cache(llama_dir, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    llm = start(llama_dir, blocker)
    assert llm.engine.runner.compile_cache is None
    assert llm.generate([[1, 2, 3]])[0].token_ids
    assert "cannot be used" in caplog.text and "make it a writable directory" in caplog.text


def test_without_a_cache_dir_nothing_is_redirected(llama_dir, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    llm = LLM(str(llama_dir), device="cpu", dtype="float32", max_model_len=256)
    assert llm.engine.runner.compile_cache is None and "TRITON_CACHE_DIR" not in os.environ


def test_old_key_directories_beyond_the_last_few_are_removed(llama_dir, tmp_path):
    for i in range(3):
        old = tmp_path / f"old{i}"
        old.mkdir()
        (old / "manifest.json").write_text("{}")
        os.utime(old / "manifest.json", (1000 + i, 1000 + i))
    (tmp_path / "x.untrusted-1").mkdir()
    start(llama_dir, tmp_path)
    current = only_key_dir_named(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["old1", "old2", current])


def only_key_dir_named(root: Path) -> str:
    return next(p.name for p in root.iterdir() if not p.name.startswith("old"))
