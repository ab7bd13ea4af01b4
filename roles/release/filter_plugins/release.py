"""release_metrics_summary: what the canary compares, read from an inferd /metrics page with
prometheus_client's own text parser (the format's reference implementation)."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - reported when the filter is used
    text_string_to_metric_families = None

REQUESTS = "inferd_requests"
LATENCY = "inferd_e2e_request_latency_seconds"
# The routes that generate; health, readiness and metrics scrapes would dilute the error rate.
GENERATING = ("/v1/chat/completions", "/v1/completions")


def release_metrics_summary(text: str) -> dict:
    """{requests, errors, latency}: generating requests, those answered 5xx, mean latency (s)."""
    if text_string_to_metric_families is None:
        raise AnsibleFilterError(
            "release_metrics_summary needs prometheus_client on the controller: pip install prometheus-client"
        )
    requests = errors = total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REQUESTS + "_total" and sample.labels.get("route") in GENERATING:
                requests += sample.value
                errors += sample.value if sample.labels.get("status", "").startswith("5") else 0
            elif sample.name == LATENCY + "_sum":
                total = sample.value
            elif sample.name == LATENCY + "_count":
                count = sample.value
    return {"requests": requests, "errors": errors, "latency": total / count if count else 0.0}


class FilterModule:
    def filters(self):
        return {"release_metrics_summary": release_metrics_summary}
