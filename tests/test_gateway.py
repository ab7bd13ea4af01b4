"""The gateway's site as the role renders it, served by a real nginx on this machine in front of a
stand-in upstream: operator routes answer 403 to clients outside gateway_restricted_allow, and a
client without an Authorization header that floods the gateway gets 429 while one with a key does
not. (molecule/site checks the same against the converged host.)"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from local_http import free_port, serve

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed here")

RENDER = """
- name: Render the gateway site as the role does
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Check the inputs as the role does (and take its defaults)
      ansible.builtin.include_role:
        name: gateway
        tasks_from: inputs
        public: true
    - name: Render the upstream from the role's template
      ansible.builtin.template:
        src: {root}/roles/gateway/templates/upstream.conf.j2
        dest: {dest}.upstream
        mode: "0644"
      vars:
        _gateway_serving_colour: blue
    - name: Render the site from the role's template
      ansible.builtin.template:
        src: {root}/roles/gateway/templates/inferd.conf.j2
        dest: {dest}
        mode: "0644"
      vars:
        _gateway_upstream_file: {dest}.upstream
"""


class Upstream(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def render(tmp_path: Path, **settings) -> subprocess.CompletedProcess:
    dest = tmp_path / "inferd.conf"
    (tmp_path / "render.yml").write_text(RENDER.format(root=ROOT, dest=dest))
    cmd = [str(BIN / "ansible-playbook"), str(tmp_path / "render.yml"), "-e", json.dumps(settings)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def gateway(tmp_path):
    """Start nginx with the rendered site; yields a function making requests to it."""
    upstream = serve(Upstream)
    pki = tmp_path / "pki"
    pki.mkdir()
    make_cert(pki, "server")
    procs = []

    def start(**settings):
        port = free_port()
        upstreams = {"blue": f"127.0.0.1:{upstream.server_port}"}
        settings = dict(gateway_port=port, gateway_pki_dir=str(pki), gateway_upstreams=upstreams, **settings)
        r = render(tmp_path, **settings)
        assert r.returncode == 0, r.stdout
        temp = "".join(f"{d}_temp_path {tmp_path}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp_path / "nginx.conf").write_text(
            f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
            f"http {{\naccess_log off;\n{temp}include {tmp_path}/inferd.conf;\n}}\n"
        )
        proc = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path), "-g", "daemon off;"])
        procs.append(proc)
        for _ in range(200):  # until it listens (or has died)
            if proc.poll() is not None:
                pytest.fail((tmp_path / "error.log").read_text())
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        context = ssl.create_default_context(cafile=str(pki / "server.crt"))
        context.check_hostname = False

        def get(path: str, key: str | None = None) -> int:
            req = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
            if key:
                req.add_header("Authorization", f"Bearer {key}")
            try:
                with urllib.request.urlopen(req, context=context) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code

        return get

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait()
    upstream.shutdown()


def test_operator_routes_answer_only_the_configured_networks(gateway):
    get = gateway(gateway_restricted_allow=["10.20.99.0/24"], gateway_unauthenticated_burst=100)
    # This machine (127.0.0.1) is outside 10.20.99.0/24: nginx refuses before the runtime sees it.
    assert get("/admin/models", key="k") == 403
    assert get("/admin", key="k") == 403
    assert get("/metrics", key="k") == 403
    # Other routes, and paths that only start alike, pass through.
    assert get("/v1/models", key="k") == 200
    assert get("/administrator", key="k") == 200


def test_operator_routes_pass_from_an_allowed_network(gateway):
    get = gateway(gateway_unauthenticated_burst=100)  # the default: loopback
    assert get("/admin/models", key="k") == 200
    assert get("/metrics", key="k") == 200


def test_a_flood_without_a_key_gets_429_and_a_client_with_a_key_does_not(gateway):
    # One request a minute after a burst of 5: of 30 in a row at most 5 + 1 a minute pass, however
    # slowly this machine sends them.
    # This test's client is on loopback, which the role leaves alone by default.
    get = gateway(gateway_unauthenticated_rate="1r/m", gateway_unauthenticated_burst=5, gateway_unauthenticated_exempt=[])
    unauthenticated = [get("/health") for _ in range(30)]
    assert unauthenticated.count(200) <= 7 and unauthenticated.count(429) >= 23, unauthenticated
    assert all(get("/v1/models", key="sk-inferd-x") == 200 for _ in range(30))


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"gateway_restricted_allow": ["10.0.0.0/8", "ops laptop"]}, "not ['ops laptop']"),
        ({"gateway_unauthenticated_rate": "10/s"}, "gateway_unauthenticated_rate '10/s' must read like 1r/s"),
        ({"gateway_restricted_paths": ["/admin"]}, "gateway_restricted_paths are first path segments"),
    ],
)
def test_bad_limits_are_refused_by_name(tmp_path, settings, named):
    r = render(tmp_path, **settings)
    assert r.returncode != 0
    assert named in r.stdout


PKI = """
- name: Install a given certificate as the role does
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Check the inputs and install the certificate
      ansible.builtin.include_role:
        name: gateway
        tasks_from: "{{ item }}"
      loop: [inputs, pki]
"""


def make_cert(tmp_path: Path, name: str, days: int = 30) -> tuple[str, str]:
    key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", f"/CN={name}.bank.example", "-keyout", str(key), "-out", str(crt), "-days", str(days)],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt.read_text(), key.read_text()


def install_pki(tmp_path: Path, **settings) -> subprocess.CompletedProcess:
    (tmp_path / "pki.yml").write_text(PKI)
    settings = dict(gateway_pki_dir=str(tmp_path / "pki"), **settings)
    cmd = [str(BIN / "ansible-playbook"), str(tmp_path / "pki.yml"), "-e", json.dumps(settings)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_a_certificate_that_does_not_match_its_key_is_refused_before_it_is_written(tmp_path):
    cert, _ = make_cert(tmp_path, "gateway")
    _, other_key = make_cert(tmp_path, "other")
    r = install_pki(tmp_path, gateway_tls_cert=cert, gateway_tls_key=other_key)
    assert r.returncode != 0
    assert "gateway_tls_cert (gateway.bank.example" in r.stdout and "does not match gateway_tls_key" in r.stdout
    assert not (tmp_path / "pki" / "server.crt").exists()
    assert "BEGIN PRIVATE KEY" not in r.stdout


def test_production_refuses_to_fall_back_to_a_private_ca(tmp_path):
    r = install_pki(tmp_path, gateway_private_ca=False)
    assert r.returncode != 0
    assert "gateway_tls_cert is empty and gateway_private_ca is false" in r.stdout
    assert not (tmp_path / "pki").exists()
