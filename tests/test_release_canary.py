"""The canary's view of an instance (roles/release's release_metrics_summary filter), read from the
runtime's own /metrics exposition: generating requests, their 5xx answers and mean latency, with
health checks and scrapes left out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prometheus_client import generate_latest

from inferd.server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("release_filters", ROOT / "roles/release/filter_plugins/release.py")
release_filters = importlib.util.module_from_spec(spec)
spec.loader.exec_module(release_filters)


def test_summary_counts_generating_requests_their_5xx_and_mean_latency():
    m = Metrics()
    m.requests.labels("/v1/chat/completions", "200").inc(7)
    m.requests.labels("/v1/completions", "503").inc(2)
    m.requests.labels("/v1/chat/completions", "500").inc(1)
    m.requests.labels("/health", "500").inc(50)  # not a generation: left out of the error rate
    for seconds in (0.5, 1.5):
        m.e2e.observe(seconds)
    summary = release_filters.release_metrics_summary(generate_latest(m.registry).decode())
    assert summary == {"requests": 10.0, "errors": 3.0, "latency": 1.0}


def test_a_fresh_instance_has_no_requests_and_no_latency():
    summary = release_filters.release_metrics_summary(generate_latest(Metrics().registry).decode())
    assert summary == {"requests": 0.0, "errors": 0.0, "latency": 0.0}
