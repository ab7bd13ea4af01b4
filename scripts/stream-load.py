#!/usr/bin/env python3
"""Bounded streaming load through the gateway, for upgrade tests (molecule/site/upgrade.yml) and
the soak (playbooks/README.md): STREAMS concurrent chat streams, each read to its `data: [DONE]`,
one after another until STOP_FILE exists (or --seconds pass). Writes a JSON report: requests sent,
failed (with the reasons), the longest gap between two tokens of one stream, and the versions the
gateway's /health reported over time. Standard library only: it runs on any host with Python 3.
With --log-requests the report also lists every request: [start, end, upstream, outcome], the
upstream from the gateway's X-Inferd-Upstream header (gateway_expose_upstream) and the outcome one
of ok, cut (answered 200, then the stream ended before [DONE]: it had started) or failed (no stream
began); molecule/site's replica test reads it.
Usage: stream-load.py URL KEY_FILE REPORT STOP_FILE [--streams N] [--ca CA] [--model NAME] [--seconds S] [--log-requests]"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import threading
import time
import urllib.parse
from pathlib import Path


def connect(url: urllib.parse.SplitResult, ctx: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if url.scheme == "https":
        return http.client.HTTPSConnection(url.hostname, url.port or 443, context=ctx, timeout=120)
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=120)


class StreamCut(RuntimeError):
    """The stream had begun (200) and ended before [DONE]."""


def one_stream(url, ctx, key: str, model: str, seen: dict | None = None) -> float:
    """Sends one streaming chat completion and reads it to [DONE]; returns its longest token gap.
    Anything else (a non-200 answer, a stream cut before [DONE], an error event) raises. `seen`
    gets the upstream that answered."""
    conn = connect(url, ctx)
    body = {"model": model, "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 24, "stream": True}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if seen is not None:
        seen["upstream"] = resp.getheader("X-Inferd-Upstream", "")
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read(300)!r}")
    gap, last, done = 0.0, None, False  # the wait for the first token is not a gap between two
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        now = time.monotonic()
        gap, last = (gap if last is None else max(gap, now - last)), now
        if line == "data: [DONE]":
            done = True
            break
        if '"error"' in line:
            raise StreamCut(f"error event: {line[:300]}")
    conn.close()
    if not done:
        raise StreamCut("stream ended before [DONE]")
    return gap


def health(url, ctx) -> str:
    conn = connect(url, ctx)
    conn.request("GET", "/health")
    h = json.loads(conn.getresponse().read())
    conn.close()
    return f"{h.get('model_version')} / {h.get('runtime_version')}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("key_file")
    ap.add_argument("report")
    ap.add_argument("stop_file")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--ca")
    ap.add_argument("--model", default="deepseek")
    ap.add_argument("--seconds", type=float, default=1800)
    ap.add_argument("--log-requests", action="store_true")
    a = ap.parse_args()
    url = urllib.parse.urlsplit(a.url)
    ctx = ssl.create_default_context(cafile=a.ca) if url.scheme == "https" else None
    key = Path(a.key_file).read_text().strip()
    stop, deadline = Path(a.stop_file), time.monotonic() + a.seconds
    lock = threading.Lock()
    report = {"sent": 0, "failed": 0, "cut": 0, "errors": [], "max_token_gap_s": 0.0, "versions": []}
    if a.log_requests:
        report["requests"] = []

    def worker():
        while not stop.exists() and time.monotonic() < deadline:
            with lock:
                report["sent"] += 1
            seen, start, outcome = {}, time.time(), "ok"
            try:
                gap = one_stream(url, ctx, key, a.model, seen)
                with lock:
                    report["max_token_gap_s"] = max(report["max_token_gap_s"], round(gap, 3))
            except Exception as e:  # every failure is counted and named in the report
                outcome = "cut" if isinstance(e, StreamCut) else "failed"
                with lock:
                    report["failed"] += 1
                    report["cut"] += outcome == "cut"
                    report["errors"].append(f"{type(e).__name__}: {e}"[:300])
            if a.log_requests:
                with lock:
                    report["requests"].append([round(start, 3), round(time.time(), 3), seen.get("upstream", ""), outcome])

    threads = [threading.Thread(target=worker) for _ in range(a.streams)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        try:
            seen = health(url, ctx)
            if not report["versions"] or report["versions"][-1]["serving"] != seen:
                report["versions"].append({"t": round(time.time(), 1), "serving": seen})
        except Exception as e:
            report["versions"].append({"t": round(time.time(), 1), "health_error": str(e)[:200]})
        time.sleep(0.5)
    Path(a.report).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
