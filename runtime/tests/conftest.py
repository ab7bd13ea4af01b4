"""Tiny random-weight models in Hugging Face format, built with transformers and tokenizers."""

from __future__ import annotations

import subprocess

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


class LiveServer:
    """The app in this process under a real uvicorn on 127.0.0.1 (real HTTP parsing, in-process
    state): the bad-request table and schemathesis run against it."""

    def __init__(self, model_dir, data_dir, **settings):
        import socket
        import threading
        import time

        import httpx
        import uvicorn

        from inferd.server.app import create_app
        from inferd.server.auth import KeyStore
        from inferd.server.config import ServerConfig

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = {
            "model": str(model_dir),
            "served_model_name": "tiny",
            "model_allow_unsigned": True,  # the tiny test model is a plain directory
            "anonymous_refusals_per_minute": 100000,  # these tests send many bad keys on purpose (test_anonymous.py)
            "data_dir": str(data_dir),
            "max_model_len": 256,
            "max_tokens_limit": 200,
            "max_body_bytes": 1 << 20,
            "limits": {"max_concurrent_per_key": 64, "requests_per_minute_per_key": 100000},
        } | settings
        self.cfg = ServerConfig(**cfg)
        store = KeyStore(self.cfg.keys_path)
        self.keys = {name: store.add(name, role) for name, role in (("alice", "user"), ("olivia", "ops"), ("adam", "admin"))}
        self.keys["rex"] = store.add("rex", "user")
        store.revoke("rex")
        self.app = create_app(self.cfg)
        self.url = f"http://127.0.0.1:{port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, name="live-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.thread.is_alive(), "uvicorn stopped during start-up"
            time.sleep(0.2)
        raise AssertionError("the in-process server did not become ready within 120 s")

    def auth(self, name: str = "alice") -> dict:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def live_server(llama_dir, tmp_path_factory):
    server = LiveServer(llama_dir, tmp_path_factory.mktemp("live"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def engine(llama_dir):
    """An engine on the tiny Llama, with the engine's defaults."""
    from inferd.config import EngineConfig
    from inferd.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(llama_dir)))


@pytest.fixture(scope="module")
def client(live_server):
    """The OpenAI client, as alice, against the live server."""
    import openai

    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=live_server.keys["alice"], max_retries=0)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (a disk that fills up); needs root, skipped otherwise."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)
