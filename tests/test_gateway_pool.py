"""roles/gateway's pool prober (files/inferd-gateway-pool.py) against stand-in runtimes on this
machine: a backend whose /ready fails is written `down` and put back when it answers again, nginx
is reloaded only when the set of servers changes, roles/release's weights file takes a port out,
and a file nginx refuses is put back. nginx itself is stood in for by commands that log their calls."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from local_http import serve

ROOT = Path(__file__).resolve().parents[1]
PROBER = ROOT / "roles/gateway/files/inferd-gateway-pool.py"


class Backend:
    """A stand-in runtime whose /ready answers self.status."""

    def __init__(self):
        self.status = 200
        owner = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(owner.status if self.path == "/ready" else 404)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = serve(H)
        self.port = self.server.server_port


@pytest.fixture
def pool(tmp_path):
    a, b = Backend(), Backend()
    log = tmp_path / "calls.log"
    cfg = {
        "upstream_file": str(tmp_path / "upstream.conf"),
        "weights_dir": str(tmp_path / "weights"),
        "lock_file": str(tmp_path / "lock"),
        "timeout_s": 2,
        "server_options": "max_fails=1 fail_timeout=5s",
        "backends": [
            {"name": "rt1", "address": "127.0.0.1", "ports": [a.port]},
            {"name": "rt2", "address": "127.0.0.1", "ports": [b.port]},
        ],
        "test_command": ["sh", "-c", f"echo test >> {log}"],
        "reload_command": ["sh", "-c", f"echo reload >> {log}"],
    }
    (tmp_path / "weights").mkdir()
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(cfg))
    yield cfg, path, a, b, log
    a.server.shutdown()
    b.server.shutdown()


def run(path: Path) -> dict:
    p = subprocess.run([sys.executable, str(PROBER), str(path), "--once"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def servers(cfg) -> list[str]:
    return [line.strip() for line in Path(cfg["upstream_file"]).read_text().splitlines() if line.strip().startswith("server ")]


def reloads(log: Path) -> int:
    return log.read_text().split().count("reload") if log.exists() else 0


def test_failing_backend_is_marked_down_and_put_back(pool):
    cfg, path, a, b, log = pool
    assert run(path)["changed"]
    text = Path(cfg["upstream_file"]).read_text()
    assert "least_conn;" in text and "keepalive 32;" in text
    assert all(" down" not in s for s in servers(cfg)) and len(servers(cfg)) == 2
    assert reloads(log) == 1

    b.status = 503
    out = run(path)
    assert out["changed"]
    down = [s for s in servers(cfg) if " down;" in s]
    assert len(down) == 1 and f":{b.port} " in down[0] and "rt2: /ready HTTP 503" in down[0]
    assert reloads(log) == 2

    # Still failing (another reason would only change the comment): no reload.
    assert not run(path)["changed"]
    assert reloads(log) == 2

    b.status = 200
    assert run(path)["changed"]
    assert all(" down" not in s for s in servers(cfg))
    assert reloads(log) == 3


def test_backend_that_refuses_connections_is_down(pool):
    cfg, path, a, b, log = pool
    b.server.shutdown()
    b.server.server_close()
    out = run(path)
    assert [s["down"] != "" for s in out["backends"]] == [False, True]


def test_weights_file_takes_a_port_out_and_weights_it(pool, tmp_path):
    cfg, path, a, b, log = pool
    (tmp_path / "weights" / "rt1.json").write_text(json.dumps({str(a.port): 0, "1": 0}))
    (tmp_path / "weights" / "rt2.json").write_text(json.dumps({str(b.port): 3}))
    run(path)
    s = servers(cfg)
    assert len(s) == 1 and f":{b.port} weight=3 " in s[0]


def test_every_backend_drained_still_gives_nginx_a_valid_upstream(pool, tmp_path):
    cfg, path, a, b, log = pool
    for name, port in (("rt1", a.port), ("rt2", b.port)):
        (tmp_path / "weights" / f"{name}.json").write_text(json.dumps({str(port): 0}))
    run(path)
    assert servers(cfg) == ["server 127.0.0.1:9 down;  # no backend takes traffic"]


def test_file_nginx_refuses_is_put_back(pool):
    cfg, path, a, b, log = pool
    run(path)
    before = Path(cfg["upstream_file"]).read_text()
    b.status = 503
    cfg["test_command"] = ["sh", "-c", "echo 'bad upstream' >&2; exit 1"]
    path.write_text(json.dumps(cfg))
    p = subprocess.run([sys.executable, str(PROBER), str(path), "--once"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "nginx refused the new upstream" in p.stderr and "bad upstream" in p.stderr
    assert Path(cfg["upstream_file"]).read_text() == before
    assert reloads(log) == 1


def test_bad_config_names_the_problem(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"upstream_file": "x", "weights_dir": "y", "backends": [{"name": "rt1"}]}))
    p = subprocess.run([sys.executable, str(PROBER), str(path), "--once"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "backends without name/address/ports" in p.stderr
