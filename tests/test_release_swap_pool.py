"""roles/release's in-place weight swap (tasks/in_place_swap.yml) on a host behind a gateway pool
(roles/gateway, gateway_pool_hosts): the host leaves the pool before the swap, so no new request
waits out the swap's pause on it, and comes back after, whether the swap succeeds or fails.

The runtime is a stand-in HTTP server on this machine that records the gateway's upstream file at
the moment the swap is asked for; the gateway is the real pool prober (files/inferd-gateway-pool.py)
with nginx's test and reload stood in for, run by the role as it runs on a gateway host."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from local_http import serve

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROBER = ROOT / "roles/gateway/files/inferd-gateway-pool.py"


class Runtime:
    """A stand-in inferd: /ready, /health, chat, and POST /admin/model/swap answering swap_status."""

    def __init__(self, upstream_file: Path):
        self.swap_status = 200
        self.swaps: list[tuple[str, str]] = []  # (model asked for, the gateway's upstream then)
        owner = self

        class H(BaseHTTPRequestHandler):
            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/ready":
                    self._json(200, {"ready": True})
                elif self.path == "/health":
                    self._json(200, {"model_version": "m2", "runtime_version": "r1"})
                else:
                    self._json(404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/admin/model/swap":
                    owner.swaps.append((body["model"], upstream_file.read_text()))
                    if owner.swap_status != 200:
                        self._json(owner.swap_status, {"error": {"message": "the stand-in refuses the swap"}})
                    else:
                        self._json(200, {"new": {"model_version": "m2"}, "pause_s": 0.1, "staging_s": 0.2})
                elif self.path == "/v1/chat/completions":
                    self._json(200, {"usage": {"completion_tokens": 2}})
                else:
                    self._json(404, {})

            def log_message(self, *a):
                pass

        self.server = serve(H)
        self.port = self.server.server_port


@pytest.fixture
def host(tmp_path):
    upstream = tmp_path / "upstream.conf"
    rt = Runtime(upstream)
    (tmp_path / "weights").mkdir()
    (tmp_path / "releases").mkdir()
    (tmp_path / "colours").mkdir()
    pool = tmp_path / "pool.json"
    pool.write_text(
        json.dumps(
            {
                "upstream_file": str(upstream),
                "weights_dir": str(tmp_path / "weights"),
                "lock_file": str(tmp_path / "lock"),
                "timeout_s": 2,
                "backends": [{"name": "rt", "address": "127.0.0.1", "ports": [rt.port]}],
                "test_command": ["true"],
                "reload_command": ["true"],
            }
        )
    )
    # The pool as the gateway serves it before the upgrade: the host takes traffic.
    subprocess.run([sys.executable, PROBER, pool, "--once"], check=True, capture_output=True)
    assert f"127.0.0.1:{rt.port} " in upstream.read_text()
    inventory = {
        "all": {
            "hosts": {
                "rt": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
                "gw": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                    "gateway_pool_hosts": ["rt"],
                },
            }
        }
    }
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    release = {"runtime_version": "r1", "model_dir": str(tmp_path / "models/m"), "adopted": True}
    extra = {
        "_gateway_pool_script": f"{sys.executable} {PROBER}",
        "_gateway_pool_config": str(pool),
        "_gateway_pool_weights_dir": str(tmp_path / "weights"),
        "_release_root": str(tmp_path / "releases"),
        "_release_colours_dir": str(tmp_path / "colours"),
        "release_ports": {"blue": rt.port, "green": 9},
        "_release_old_colour": "blue",
        "_release_old_unit": "inferd@blue",
        "_release_target": {**release, "id": "r-new", "model_dir": str(tmp_path / "models/m2"), "model_version": "m2"},
        "_release_serving": {**release, "id": "r-old", "model_version": "m1"},
        "inference_runtime_api_keys": [
            {"name": "a", "role": "admin", "key": "a" * 40},
            {"name": "u", "role": "user", "key": "u" * 40},
        ],
        "inference_runtime_metrics_token": "",
        "inference_runtime_served_model_name": "m",
    }
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    (tmp_path / "play.yml").write_text(
        "- hosts: rt\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: release\n        tasks_from: in_place_swap.yml\n"
    )
    yield rt, upstream, tmp_path
    rt.server.shutdown()


def swap(tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "ansible-playbook", "-i", tmp / "inventory.json", "-e", f"@{tmp / 'extra.json'}", tmp / "play.yml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "HOME": str(tmp)},
    )


def takes_traffic(upstream_text: str, port: int) -> bool:
    return any(
        line.strip().startswith(f"server 127.0.0.1:{port} ") and " down;" not in line for line in upstream_text.splitlines()
    )


def test_swap_happens_out_of_the_pool_and_the_host_comes_back(host):
    rt, upstream, tmp = host
    r = swap(tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert [m for m, _ in rt.swaps] == ["m2"]
    assert not takes_traffic(rt.swaps[0][1], rt.port), rt.swaps[0][1]
    assert takes_traffic(upstream.read_text(), rt.port)
    assert "out of the pool meanwhile" in r.stdout


def test_failed_swap_puts_the_host_back_with_the_previous_weights(host):
    rt, upstream, tmp = host
    rt.swap_status = 400
    r = swap(tmp)
    assert r.returncode != 0 and "failed to swap in place" in r.stdout + r.stderr, r.stdout[-3000:]
    # The swap, then the swap back to the serving package, both while the host was out of the pool.
    assert [m for m, _ in rt.swaps] == ["m2", "m"]
    assert all(not takes_traffic(text, rt.port) for _, text in rt.swaps)
    assert takes_traffic(upstream.read_text(), rt.port)
