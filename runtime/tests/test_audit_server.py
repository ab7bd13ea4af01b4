"""The audit log through `inferd serve`: every way a request can stop leaves a record, or a gap
the log itself explains (issue 24 item 2)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_server import MSG, Server, inferd, post

from inferd.server.audit import read_records

# Each engine step sleeps, so that a stream of 150 tokens is still going when the test stops it.
SLOW_STEPS = """
import sys, time
from inferd.cli import main
from inferd.engine import async_engine

serving_init = async_engine.AsyncLLMEngine.__init__

def init(self, engine, *args, **kw):
    step = engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    engine.step = slow_step
    serving_init(self, engine, *args, **kw)

async_engine.AsyncLLMEngine.__init__ = init
sys.exit(main(sys.argv[1:]))
"""
LONG = {"model": "tiny", "prompt": "The", "max_tokens": 150, "stream": True, "temperature": 0}


def records(s: Server) -> list[dict]:
    return read_records(s.data_dir / "audit" / "audit.log")


def of_request(s: Server, rid: str) -> dict[str, dict]:
    return {r["kind"]: r for r in records(s) if r.get("request_id") == rid}


def wait_for(check, timeout: float = 30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("not within the timeout")


def verify(s: Server) -> tuple[int, str]:
    r = inferd("audit", "verify", "--config", str(s.config))
    return r.returncode, r.stdout + r.stderr


def stream_until(s: Server, chunks: int, then) -> str:
    """Read `chunks` data lines of a long stream, call `then()` and return the request id."""
    h = {"Authorization": f"Bearer {s.keys['alice']}"}
    with httpx.stream("POST", s.url + "/v1/completions", json=LONG, headers=h, timeout=60) as r:
        seen, rid = 0, None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                rid = rid or json.loads(line[6:])["id"]
                seen += 1
                if seen == 1:
                    # The begin was durable before the first byte of output.
                    assert "begin" in of_request(s, rid), "no begin on disk when the first chunk arrived"
                if seen == chunks:
                    then()
                    return rid
    raise AssertionError("the stream ended before the test stopped it")


def restart_and_stop(s: Server) -> None:
    with open(s.data_dir / "restart.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--config", str(s.config)], stdout=log, stderr=log)
        try:
            wait_for(lambda: ready(s), 120)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def ready(s: Server) -> bool:
    try:
        return httpx.get(s.url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    s = Server(llama_dir, tmp_path_factory.mktemp("audited"), {"audit_segment_bytes": 4096}, python_code=SLOW_STEPS)
    yield s
    s.stop()


def test_a_stream_the_client_leaves_has_a_begin_and_an_end_that_says_so(server):
    rid = stream_until(server, 20, lambda: None)  # leaving the `with` closes the connection
    ends = wait_for(lambda: of_request(server, rid).get("end"))
    begin = of_request(server, rid)["begin"]
    assert begin["key_name"] == "alice" and begin["client"].startswith("127.0.0.1:") and begin["prompt_tokens"] > 0
    assert ends["status"] == 499 and "client disconnected" in ends["cut_short"]
    assert 19 <= ends["completion_tokens"] < 150, ends


def test_a_completed_request_has_its_outcome_in_the_end(server):
    r = post(server, {"model": "tiny", "messages": MSG, "max_tokens": 3})
    assert r.status_code == 200
    rec = of_request(server, r.json()["id"])
    assert rec["end"]["status"] == 200 and rec["end"]["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert rec["begin"]["seq"] < rec["end"]["seq"] and "cut_short" not in rec["end"]


def test_admin_logs_pages_back_to_the_first_record(server):
    for _ in range(12):
        post(server, {"model": "tiny", "messages": MSG, "max_tokens": 1})
    ops = {"Authorization": f"Bearer {server.keys['olivia']}"}
    first = httpx.get(server.url + "/admin/logs", params={"limit": 10}, headers=ops).json()
    pages, cursor = first["records"], first["next_before"]
    while cursor:
        page = httpx.get(server.url + "/admin/logs", params={"limit": 10, "before": cursor}, headers=ops).json()
        assert len(page["records"]) <= 10
        pages, cursor = page["records"] + pages, page["next_before"]
    assert [r["seq"] for r in pages] == list(range(pages[-1]["seq"] + 1)), "every record once, in order"
    assert len({r["segment"] for r in pages if r["kind"] == "segment"}) > 1, "the pages crossed segments"
    bad = httpx.get(server.url + "/admin/logs", params={"before": "x"}, headers=ops)
    assert bad.status_code == 400 and "cursor" in bad.json()["error"]["message"]
    code, out = verify(server)
    assert code == 0, out


def test_kill_9_mid_stream_is_an_explained_interruption(llama_dir, tmp_path):
    s = Server(llama_dir, tmp_path, python_code=SLOW_STEPS)
    rid = stream_until(s, 5, lambda: s.stop(signal.SIGKILL))
    code, out = verify(s)
    assert code == 0 and f"request {rid}" in out and "no end" in out, out
    restart_and_stop(s)  # the restart says the last run was killed
    code, out = verify(s)
    assert code == 0 and f"request {rid} (begun at record" in out and "killed or crashed" in out, out


def test_sigterm_past_the_shutdown_timeout_ends_the_stream_in_the_log(llama_dir, tmp_path):
    s = Server(llama_dir, tmp_path, {"shutdown_timeout_s": 1}, python_code=SLOW_STEPS)
    rid = stream_until(s, 3, lambda: s.proc.send_signal(signal.SIGTERM))
    s.proc.wait(60)
    s.log.close()
    end = of_request(s, rid).get("end")
    assert end and end["status"] == 499 and end["cut_short"], end
    assert records(s)[-1]["kind"] == "stop"
    code, out = verify(s)
    assert code == 0 and "0 requests interrupted" in out, out
