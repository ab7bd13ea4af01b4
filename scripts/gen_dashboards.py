#!/usr/bin/env python3
"""Generate the Grafana dashboards under roles/grafana/files/dashboards/ from the runtime's one
metric-name module, so a renamed metric changes (or breaks) the dashboards with it.

    python scripts/gen_dashboards.py          # write the JSON files
    python scripts/gen_dashboards.py --check  # exit 1 if the committed files differ (tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
from inferd.server import metric_names as m  # noqa: E402

OUT = ROOT / "roles" / "grafana" / "files" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "inferd-prometheus"}


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, label: str) -> list[dict]:
    return [
        q(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket[5m])))", f"{label} p{int(p * 100)}") for p in (0.5, 0.99)
    ]


def dashboard(uid: str, title: str, panels: list[tuple[str, str, list[dict]]]) -> dict:
    out = []
    for i, (panel_title, unit, targets) in enumerate(panels):
        out.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": panel_title,
                "datasource": DATASOURCE,
                "gridPos": {"x": (i % 2) * 12, "y": (i // 2) * 8, "w": 12, "h": 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [dict(t, refId=chr(ord("A") + j), datasource=DATASOURCE) for j, t in enumerate(targets)],
            }
        )
    return {
        "uid": uid,
        "title": title,
        "tags": ["inferd"],
        "schemaVersion": 39,
        "editable": False,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "panels": out,
    }


def dashboards() -> dict[str, dict]:
    service = dashboard(
        "inferd-service",
        "inferd: service overview",
        [
            ("Requests per second by status", "reqps", [q(f"sum by (status) (rate({m.REQUESTS_TOTAL}[5m]))", "{{status}}")]),
            ("Time to first token", "s", quantiles(m.TIME_TO_FIRST_TOKEN, "TTFT")),
            ("Time per output token", "s", quantiles(m.TIME_PER_OUTPUT_TOKEN, "TPOT")),
            ("End-to-end latency", "s", quantiles(m.E2E_LATENCY, "E2E")),
            ("Running and queued requests", "short", [q(m.REQUESTS_RUNNING, "running"), q(m.REQUESTS_WAITING, "waiting")]),
            (
                "Tokens per second",
                "short",
                [q(f"rate({m.GENERATION_TOKENS}[5m])", "generated"), q(f"rate({m.PROMPT_TOKENS}[5m])", "prompt")],
            ),
            ("KV-cache usage", "percentunit", [q(m.KV_CACHE_USAGE, "used")]),
            (
                "Prefix-cache hit ratio",
                "percentunit",
                [q(f"{m.PREFIX_CACHE_HITS} / clamp_min({m.PREFIX_CACHE_QUERIES}, 1)", "hits")],
            ),
            # The host-memory tier of the prefix cache (host_kv_cache_gb): blocks restored instead of
            # recomputed, and how full it is.
            (
                "Host KV tier",
                "short",
                [
                    q(f"rate({m.HOST_KV_CACHE_HITS}[5m])", "blocks restored/s"),
                    q(m.HOST_KV_CACHE_BLOCKS, "blocks held"),
                    q(m.HOST_KV_CACHE_CAPACITY, "capacity (blocks)"),
                ],
            ),
            ("Host KV tier memory", "bytes", [q(m.HOST_KV_CACHE_BYTES, "held")]),
            # Speculative decoding (engine/speculative.py): how many drafts the target accepts, and the
            # steps taken plain while speculation measured slower (SpecGate); 0 when off.
            (
                "Speculative decoding acceptance",
                "short",
                [
                    q(
                        f"rate({m.SPEC_DECODE_ACCEPTED_TOKENS}[5m]) / clamp_min(rate({m.SPEC_DECODE_DRAFT_TOKENS}[5m]), 1e-9)",
                        "accepted / drafted",
                    ),
                    q(f"rate({m.SPEC_DECODE_DRAFT_TOKENS}[5m])", "drafted/s"),
                    q(f"rate({m.SPEC_DECODE_ACCEPTED_TOKENS}[5m])", "accepted/s"),
                    q(f"rate({m.SPEC_DECODE_PAUSED_STEPS}[5m])", "steps paused (slower than plain)/s"),
                ],
            ),
            (
                "Model ready and loads",
                "short",
                [
                    q(m.MODEL_READY, "ready"),
                    q(f"increase({m.MODEL_LOAD_ATTEMPTS}[1h])", "load attempts (1h)"),
                    q(f"increase({m.MODEL_LOAD_FAILURES}[1h])", "load failures (1h)"),
                ],
            ),
            (
                "Audit records",
                "short",
                [q(f"rate({m.AUDIT_RECORDS}[5m])", "written/s"), q(m.AUDIT_RING_DEPTH, "queued"), q(m.AUDIT_DROPPED, "dropped")],
            ),
            ("Rate-limited requests", "reqps", [q(f"sum by (reason) (rate({m.RATE_LIMITED}[5m]))", "{{reason}}")]),
            # In-place upgrades (POST /admin/model/swap): how many, how they ended, how long serving paused.
            (
                "In-place model swaps",
                "short",
                [
                    q(f"sum by (result) (increase({m.MODEL_SWAPS}[1h]))", "{{result}} (1h)"),
                    q(m.MODEL_SWAP_PAUSE, "last pause (s)"),
                ],
            ),
            # Which release serves (playbooks/upgrade.yml): one line per model digest and runtime version.
            (
                "Serving release",
                "short",
                [q(f"max by (model_version, runtime_version) ({m.BUILD_INFO})", "{{runtime_version}} {{model_version}}")],
            ),
        ],
    )
    gpu = dashboard(
        "inferd-gpu",
        "inferd: GPUs",
        [
            ("GPU utilisation", "percentunit", [q(m.GPU_UTILIZATION, "gpu {{gpu}}")]),
            ("SM activity (GPM)", "percentunit", [q(m.GPU_SM_ACTIVITY, "gpu {{gpu}}")]),
            ("DRAM bandwidth utilisation (GPM)", "percentunit", [q(m.GPU_DRAM_BANDWIDTH, "gpu {{gpu}}")]),
            ("GPU memory", "bytes", [q(m.GPU_MEMORY_USED, "used {{gpu}}"), q(m.GPU_MEMORY_TOTAL, "total {{gpu}}")]),
            ("GPU temperature", "celsius", [q(m.GPU_TEMPERATURE, "gpu {{gpu}}")]),
            ("GPU power", "watt", [q(m.GPU_POWER, "gpu {{gpu}}")]),
            ("Uncorrected ECC errors", "short", [q(m.GPU_ECC_ERRORS, "gpu {{gpu}}")]),
        ],
    )
    host = dashboard(
        "inferd-host",
        "inferd: host",
        [
            (
                "CPU busy",
                "percentunit",
                [q('1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[5m]))', "{{instance}}")],
            ),
            (
                "Memory used",
                "percentunit",
                [q("1 - node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes", "{{instance}}")],
            ),
            (
                "Filesystem free",
                "percentunit",
                [
                    q(
                        'node_filesystem_avail_bytes{fstype!~"tmpfs|ramfs"} / node_filesystem_size_bytes{fstype!~"tmpfs|ramfs"}',
                        "{{mountpoint}}",
                    )
                ],
            ),
            ("Disk writes", "Bps", [q("rate(node_disk_written_bytes_total[5m])", "{{device}}")]),
            ("NVMe percentage used", "percent", [q(m.NVME_PERCENTAGE_USED, "{{device}}")]),
            ("NVMe media errors", "short", [q(m.NVME_MEDIA_ERRORS, "{{device}}")]),
            ("NVMe SMART log readable", "short", [q(m.NVME_SMART_OK, "{{device}}")]),
        ],
    )
    return {"inferd-service.json": service, "inferd-gpu.json": gpu, "inferd-host.json": host}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args()
    stale = []
    for name, data in dashboards().items():
        text = json.dumps(data, indent=1) + "\n"
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"dashboards out of date: {', '.join(stale)}; run: python scripts/gen_dashboards.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
