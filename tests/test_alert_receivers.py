"""Alerts reach someone: the Alertmanager configuration the monitoring role writes, with a webhook
and e-mail receivers, passes `amtool check-config`, and a real Alertmanager run with it on this
machine delivers a posted alert to a local webhook sink. Incomplete e-mail settings are refused by
name. (molecule/site delivers an alert from the converged host's Alertmanager the same way.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from local_http import free_port, serve

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE = Path(sys.executable).parent / "ansible"
AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

EMAIL = {
    "monitoring_alertmanager_email_to": ["oncall@bank.example", "risk@bank.example"],
    "monitoring_alertmanager_email_from": "inferd@bank.example",
    "monitoring_alertmanager_smtp_smarthost": "smtp.bank.example:587",
    "monitoring_alertmanager_smtp_auth_username": "inferd",
    "monitoring_alertmanager_smtp_auth_password": "not-a-real-password",
}


def render(dest: Path, settings: dict) -> Path:
    args = [str(ANSIBLE), "localhost", "-c", "local", "-m", "ansible.builtin.template"]
    args += ["-a", f"src={ROOT}/roles/monitoring/templates/alertmanager.yml.j2 dest={dest}"]
    args += ["-e", f"@{ROOT}/roles/monitoring/defaults/main.yml", "-e", json.dumps(settings)]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


@pytest.mark.skipif(AMTOOL is None, reason="amtool is not installed here")
def test_webhook_and_email_receivers_pass_amtool(tmp_path):
    conf = render(tmp_path / "am.yml", {"monitoring_alertmanager_webhook_url": "https://tickets.bank.example/hook", **EMAIL})
    r = subprocess.run([AMTOOL, "check-config", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    parsed = yaml.safe_load(conf.read_text())
    assert parsed["route"]["receiver"] == "inferd"
    (receiver,) = [x for x in parsed["receivers"] if x["name"] == "inferd"]
    assert receiver["webhook_configs"][0]["url"] == "https://tickets.bank.example/hook"
    assert [e["to"] for e in receiver["email_configs"]] == EMAIL["monitoring_alertmanager_email_to"]
    assert parsed["global"]["smtp_smarthost"] == "smtp.bank.example:587"


def test_without_receivers_alerts_are_kept_only(tmp_path):
    parsed = yaml.safe_load(render(tmp_path / "am.yml", {}).read_text())
    assert parsed["route"]["receiver"] == "keep" and "global" not in parsed


@pytest.mark.parametrize(
    "change, named",
    [
        ({"monitoring_alertmanager_smtp_smarthost": ""}, "monitoring_alertmanager_smtp_smarthost the relay as host:port ('')"),
        ({"monitoring_alertmanager_email_from": "inferd"}, "monitoring_alertmanager_email_from must be an address ('inferd')"),
        ({"monitoring_alertmanager_email_to": ["oncall"]}, "['oncall'] are not"),
    ],
)
def test_incomplete_email_settings_are_refused_by_name(tmp_path, change, named):
    play = tmp_path / "play.yml"
    preflight = {"ansible.builtin.import_tasks": f"{ROOT}/roles/monitoring/tasks/preflight.yml"}
    play.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [preflight]}]))
    cmd = [str(ANSIBLE) + "-playbook", "-i", "localhost,", "-c", "local", str(play)]
    cmd += ["-e", f"@{ROOT}/roles/monitoring/defaults/main.yml", "-e", json.dumps({**EMAIL, **change})]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert named in r.stdout
    assert "not-a-real-password" not in r.stdout


class Sink(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.skipif(ALERTMANAGER is None, reason="Alertmanager is not installed here")
def test_an_alert_reaches_the_webhook(tmp_path):
    sink = serve(Sink)
    url = f"http://127.0.0.1:{sink.server_port}/alerts"
    conf = render(tmp_path / "am.yml", {"monitoring_alertmanager_webhook_url": url, "monitoring_alertmanager_group_wait": "1s"})
    port = free_port()
    am = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={conf}", f"--storage.path={tmp_path}/data", f"--web.listen-address=127.0.0.1:{port}",
         "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        alert = json.dumps([{"labels": {"alertname": "InferdDown", "instance": "gpu01"}}]).encode()
        posted = False
        for _ in range(600):  # until Alertmanager takes the alert, then until the sink has it
            if not posted:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v2/alerts", data=alert, method="POST")
                req.add_header("Content-Type", "application/json")
                try:
                    posted = urllib.request.urlopen(req).status == 200
                except OSError:
                    pass
            if Sink.received or am.poll() is not None:
                break
            time.sleep(0.1)
        assert am.poll() is None, "Alertmanager exited"
        assert Sink.received, "no notification reached the webhook"
        assert Sink.received[0]["alerts"][0]["labels"]["alertname"] == "InferdDown"
        assert Sink.received[0]["receiver"] == "inferd"
    finally:
        am.terminate()
        am.wait()
        sink.shutdown()
