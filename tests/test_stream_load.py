"""scripts/stream-load.py against a stand-in gateway on this machine: a stream read to [DONE] is
ok, one cut after it began (200, no [DONE]) is counted apart as `cut`, an answer that never began a
stream is `failed`, and --log-requests records the X-Inferd-Upstream of each (molecule/site's
replica test tells the hosts apart by it)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from local_http import serve

ROOT = Path(__file__).resolve().parents[1]


def test_outcomes_and_upstreams_are_recorded(tmp_path):
    turn = itertools.count()

    class Gateway(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # /health
            body = b'{"model_version": "m1", "runtime_version": "r1"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            n = next(turn) % 3
            if n == 2:
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Inferd-Upstream", f"10.0.0.{n + 1}:8000")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b'data: {"choices": []}\n\n')
            if n == 0:
                self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

        def log_message(self, *a):
            pass

    srv = serve(Gateway)
    (tmp_path / "key").write_text("k")
    report = tmp_path / "report.json"
    try:
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/stream-load.py"), f"http://127.0.0.1:{srv.server_address[1]}",
             str(tmp_path / "key"), str(report), str(tmp_path / "stop"), "--streams", "1", "--seconds", "1", "--log-requests"],
            check=True, timeout=60,
        )  # fmt: skip
    finally:
        srv.shutdown()
    r = json.loads(report.read_text())
    outcomes = {(u, o) for _, _, u, o in r["requests"]}
    assert ("10.0.0.1:8000", "ok") in outcomes
    assert ("10.0.0.2:8000", "cut") in outcomes
    assert ("", "failed") in outcomes
    assert r["cut"] == sum(o == "cut" for *_, o in r["requests"]) > 0
    assert r["failed"] == sum(o != "ok" for *_, o in r["requests"])
    assert all(start <= end for start, end, *_ in r["requests"])
