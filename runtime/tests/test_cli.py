from __future__ import annotations

import subprocess
import sys

from inferd import LLM, SamplingParams


def inferd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_names_the_commands():
    r = inferd("--help")
    assert r.returncode == 0 and "generate" in r.stdout


def test_generate_prints_the_greedy_completion(llama_dir):
    expected = LLM(str(llama_dir)).generate(["The quick brown fox"], SamplingParams(max_tokens=6, temperature=0.0))[0].text
    r = inferd("generate", "--model", str(llama_dir), "--prompt", "The quick brown fox", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_errors_are_one_clear_line(tmp_path):
    r = inferd("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2
    assert "config.json not found" in r.stderr and "Traceback" not in r.stderr
    r = inferd("generate", "--model", str(tmp_path), "--prompt", "x", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_serve_with_a_bad_dtype_exits_at_start_naming_the_field(llama_dir, tmp_path):
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"model": str(llama_dir), "dtype": "float8", "data_dir": str(tmp_path), "port": port}))
    r = inferd("serve", "--config", str(config))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "dtype" in r.stderr and "float32, bfloat16 or float16" in r.stderr and "Traceback" not in r.stderr
