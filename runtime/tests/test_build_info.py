"""What serves is visible on the API: /health, /v1/models and inferd_build_info carry the model's
version (the packed manifest's digest, or the one the deployment records) and the runtime's."""

from __future__ import annotations

import hashlib
from importlib import metadata

import httpx
from test_server import Server, inferd

from inferd.server.build_info import build_info, model_version


def test_model_version_is_the_manifest_digest_or_the_configured_one(tmp_path):
    assert model_version(tmp_path) is None
    (tmp_path / "manifest.json").write_bytes(b'{"format": 1}')
    assert model_version(tmp_path) == "sha256:" + hashlib.sha256(b'{"format": 1}').hexdigest()
    assert model_version(tmp_path, "sha256:abc") == "sha256:abc"
    decrypted = tmp_path / "decrypted"
    decrypted.mkdir()
    (decrypted / ".inferd-package-manifest.json").write_bytes(b'{"format": 2}')
    assert model_version(decrypted) == "sha256:" + hashlib.sha256(b'{"format": 2}').hexdigest()
    assert build_info(tmp_path)["runtime_version"] == metadata.version("inferd")


def test_health_models_and_metrics_name_the_packed_model_and_the_runtime(llama_dir, tmp_path):
    packed = tmp_path / "packed"
    assert inferd("pack", str(llama_dir), str(packed)).returncode == 0
    digest = "sha256:" + hashlib.sha256((packed / "manifest.json").read_bytes()).hexdigest()
    (tmp_path / "srv").mkdir()
    s = Server(packed, tmp_path / "srv")
    try:
        runtime = metadata.version("inferd")
        health = httpx.get(s.url + "/health").json()
        assert health == {"status": "ok", "model_version": digest, "runtime_version": runtime}
        entry = httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {s.keys['alice']}"}).json()["data"][0]
        assert entry["model_version"] == digest and entry["runtime_version"] == runtime
        metrics = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {s.keys['olivia']}"}).text
        assert f'inferd_build_info{{model="tiny",model_version="{digest}",runtime_version="{runtime}"}} 1.0' in metrics
    finally:
        s.stop()


def test_a_configured_model_version_is_reported_for_a_plain_directory(llama_dir, tmp_path):
    s = Server(llama_dir, tmp_path, {"model_version": "sha256:0123"})
    try:
        assert httpx.get(s.url + "/health").json()["model_version"] == "sha256:0123"
    finally:
        s.stop()
