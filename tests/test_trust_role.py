"""The role hands the service what it needs to check a model's signature itself (issue 24: the
server opened any directory): the signer's public key file, and model_allow_unsigned only where
the inventory turned signatures off. The rendered config is one the runtime accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
from inferd.server.config import ServerConfig  # noqa: E402

ANSIBLE = Path(sys.executable).parent / "ansible"
ROLE = ROOT / "roles/inference_runtime"


def render_config(tmp_path: Path, extra: dict) -> dict:
    dest = tmp_path / "config.yaml"
    args = [str(ANSIBLE), "localhost", "-c", "local", "-m", "ansible.builtin.template"]
    args += ["-a", f"src={ROLE}/templates/config.yaml.j2 dest={dest}"]
    args += ["-e", f"@{ROLE}/defaults/main.yml", "-e", f"@{ROLE}/vars/main.yml", "-e", json.dumps(extra)]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return yaml.safe_load(dest.read_text())


@pytest.mark.parametrize(
    "extra,public_key_file,allow_unsigned",
    [
        ({"inference_runtime_model_public_key": "PEM"}, "/etc/inferd/model-signing.pub", False),
        ({"inference_runtime_model_require_signature": False}, None, True),
    ],
)
def test_the_service_gets_the_public_key_and_no_unsigned_by_default(tmp_path, extra, public_key_file, allow_unsigned):
    cfg = ServerConfig(**render_config(tmp_path, extra))
    assert cfg.model_public_key_file == public_key_file
    assert cfg.model_allow_unsigned is allow_unsigned
    assert cfg.results_max_mb == 1024 and cfg.results_retention_hours == 24
