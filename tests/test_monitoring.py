"""The monitoring and grafana roles' files, offline: the alert rules render, `promtool check
rules` accepts them and `promtool test rules` sees every alert fire and stay quiet; every metric
name used by an alert or a dashboard panel is one the runtime exports (its metric_names module) or
node exporter's; the dashboards are what the generator makes; the Grafana provisioning files
parse. (The molecule `site` scenario evaluates the same queries against the live Prometheus.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
from inferd.server import metric_names  # noqa: E402

RUNTIME_METRICS = {v for k, v in vars(metric_names).items() if k.isupper() and k != "PREFIX"}
NODE_METRICS = {
    "up",
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_memory_MemTotal_bytes",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "node_disk_written_bytes_total",
}
PROMQL_WORDS = {
    "sum",
    "by",
    "max",
    "min",
    "avg",
    "rate",
    "increase",
    "histogram_quantile",
    "clamp_min",
    "le",
    "without",
}
ANSIBLE = Path(sys.executable).parent / "ansible"


def render(role: str, template: str, dest: Path, extra: list[str] = ()) -> Path:
    args = [str(ANSIBLE), "localhost", "-c", "local", "-m", "ansible.builtin.template"]
    args += ["-a", f"src={ROOT}/roles/{role}/templates/{template} dest={dest}"]
    for f in ("defaults/main.yml", "vars/main.yml"):
        if (ROOT / "roles" / role / f).exists():
            args += ["-e", f"@{ROOT}/roles/{role}/{f}"]
    for e in extra:
        args += ["-e", e]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> Path:
    return render("monitoring", "inferd.rules.yml.j2", tmp_path_factory.mktemp("rules") / "inferd.yml")


def metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL_WORDS
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names if not re.fullmatch(r"[0-9e.]+", n)}


def all_alert_exprs(rules_file: Path) -> dict[str, str]:
    doc = yaml.safe_load(rules_file.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def all_panel_exprs() -> dict[str, str]:
    out = {}
    for f in sorted((ROOT / "roles/grafana/files/dashboards").glob("*.json")):
        for panel in json.loads(f.read_text())["panels"]:
            for t in panel["targets"]:
                out[f"{f.stem}: {panel['title']} ({t['refId']})"] = t["expr"]
    return out


def test_promtool_accepts_the_rules(rules):
    r = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 15 rules found" in r.stdout


def test_every_alert_has_a_runbook_and_a_severity(rules):
    doc = yaml.safe_load(rules.read_text())
    for rule in doc["groups"][0]["rules"]:
        assert rule["annotations"]["runbook"] and rule["annotations"]["summary"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_alert_and_panel_metrics_are_exported_names(rules):
    exprs = {**all_alert_exprs(rules), **all_panel_exprs()}
    unknown = {k: sorted(metric_names_in(e) - RUNTIME_METRICS - NODE_METRICS) for k, e in exprs.items()}
    assert not {k: v for k, v in unknown.items() if v}, "metric names not exported by inferd or node exporter"
    used = set().union(*(metric_names_in(e) for e in exprs.values()))
    assert RUNTIME_METRICS - used == set(), "runtime metrics no alert or panel shows"


def test_a_renamed_metric_is_caught(rules):
    renamed = all_alert_exprs(rules)["InferdTTFTHigh"].replace("time_to_first_token", "ttft")
    assert metric_names_in(renamed) - RUNTIME_METRICS - NODE_METRICS == {"inferd_ttft_seconds"}


def test_dashboards_are_what_the_generator_makes():
    r = subprocess.run([sys.executable, "scripts/gen_dashboards.py", "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_runtime_is_scraped_on_every_colour_port_by_host(tmp_path):
    """After a blue-green upgrade the runtime serves on the other colour's port: Prometheus scrapes
    each runtime host on both (and its own target's port), labelled by host for InferdDown."""
    targets = '{"monitoring_runtime_targets": ["10.0.0.1:8000", "10.0.0.2:9000"]}'
    cfg = yaml.safe_load(render("monitoring", "prometheus.yml.j2", tmp_path / "p.yml", [targets]).read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "inferd"]
    want = ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:9000", "10.0.0.2:8000", "10.0.0.2:8001"]
    assert job["static_configs"][0]["targets"] == want
    (relabel,) = job["relabel_configs"]
    assert re.fullmatch(relabel["regex"], "10.0.0.2:8001") and relabel["target_label"] == "host"
    subprocess.run(["promtool", "check", "config", "--syntax-only", str(tmp_path / "p.yml")], check=True, capture_output=True)


def test_grafana_provisioning_files_parse(tmp_path):
    ds = yaml.safe_load(render("grafana", "datasource.yml.j2", tmp_path / "ds.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "inferd-prometheus"
    assert source["url"] == "http://127.0.0.1:9090"
    prov = yaml.safe_load(render("grafana", "dashboard.yml.j2", tmp_path / "db.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/inferd"
    uids = set()
    for f in (ROOT / "roles/grafana/files/dashboards").glob("*.json"):
        d = json.loads(f.read_text())
        uids.add(d["uid"])
        assert d["panels"] and all(p["targets"] and p["datasource"]["uid"] == source["uid"] for p in d["panels"])
    assert uids == {"inferd-service", "inferd-gpu", "inferd-host"}


# ---- promtool test rules: every alert fires on a bad series and stays quiet on a good one ----
H = 'instance="h:8000",job="inferd"'


def sel(metric: str, **labels: str) -> str:
    """metric{labels..., instance="h:8000", job="inferd"}"""
    extra = "".join(f'{k}="{v}",' for k, v in labels.items())
    return metric + "{" + extra + H + "}"


def hist(metric: str, slow_le: str) -> list[dict]:
    """Ten observations a minute, all in the bucket ending at slow_le."""
    return [
        {"series": f'{metric}_bucket{{le="{le}"}}', "values": "0+10x40" if float(le) >= float(slow_le) else "0x40"}
        for le in ("1", "10", "100", "+Inf")
    ]


# alert: (series when it must fire, series when it must not, eval time, labels of the firing alert)
CASES = {
    # Blue-green: the idle colour's port is down while the other serves (quiet); both down fires.
    "InferdDown": (
        [('up{host="h",instance="h:8000",job="inferd"}', "0x10"), ('up{host="h",instance="h:8001",job="inferd"}', "0x10")],
        [('up{host="h",instance="h:8000",job="inferd"}', "0x10"), ('up{host="h",instance="h:8001",job="inferd"}', "1x10")],
        "3m",
        {"host": "h"},
    ),
    "InferdNotReady": (
        [(sel("inferd_model_ready"), "0x10")],
        [(sel("inferd_model_ready"), "1x10")],
        "7m",
        {"instance": "h:8000", "job": "inferd"},
    ),
    "InferdTTFTHigh": (
        hist("inferd_time_to_first_token_seconds", "10"),
        hist("inferd_time_to_first_token_seconds", "1"),
        "20m",
        {},
    ),
    "InferdE2ELatencyHigh": (
        hist("inferd_e2e_request_latency_seconds", "100"),
        hist("inferd_e2e_request_latency_seconds", "10"),
        "20m",
        {},
    ),
    "InferdModelLoadFailures": (
        [(sel("inferd_model_load_failures_total"), "0 0 1 1 1 1")],
        [(sel("inferd_model_load_failures_total"), "0x6")],
        "4m",
        {"instance": "h:8000", "job": "inferd"},
    ),
    "InferdAuditRecordsDropped": (
        [(sel("inferd_audit_records_dropped_total"), "0 0 3 3")],
        [(sel("inferd_audit_records_dropped_total"), "0x4")],
        "3m",
        {"instance": "h:8000", "job": "inferd"},
    ),
    "InferdResultsNotStored": (
        [(sel("inferd_results_store_errors_total"), "0 0 1 1"), (sel("inferd_results_store_degraded"), "0 1 0 0")],
        [(sel("inferd_results_store_errors_total"), "0x4"), (sel("inferd_results_store_degraded"), "0x4")],
        "3m",
        {"instance": "h:8000", "job": "inferd"},
    ),
    "InferdKeysFileInvalid": (
        [(sel("inferd_keys_file_invalid"), "1x3")],
        [(sel("inferd_keys_file_invalid"), "0x3")],
        "2m",
        {"instance": "h:8000", "job": "inferd"},
    ),
    "InferdResultsStoreQuarantined": (
        [(sel("inferd_results_store_quarantined"), "1x3")],
        [(sel("inferd_results_store_quarantined"), "0x3")],
        "2m",
        {"instance": "h:8000", "job": "inferd"},
    ),
    "GpuTemperatureHigh": (
        [(sel("inferd_gpu_temperature_celsius", gpu="0"), "90x10")],
        [(sel("inferd_gpu_temperature_celsius", gpu="0"), "70x10")],
        "7m",
        {"gpu": "0", "instance": "h:8000", "job": "inferd"},
    ),
    "GpuEccErrors": (
        [(sel("inferd_gpu_ecc_uncorrected_errors", gpu="0"), "0 2 2")],
        [(sel("inferd_gpu_ecc_uncorrected_errors", gpu="0"), "0x3")],
        "2m",
        {"gpu": "0", "instance": "h:8000", "job": "inferd"},
    ),
    "GpuMemoryNearlyFull": (
        [(sel("inferd_gpu_memory_used_bytes", gpu="0"), "99x20"), (sel("inferd_gpu_memory_total_bytes", gpu="0"), "100x20")],
        [(sel("inferd_gpu_memory_used_bytes", gpu="0"), "90x20"), (sel("inferd_gpu_memory_total_bytes", gpu="0"), "100x20")],
        "15m",
        {"gpu": "0", "instance": "h:8000"},
    ),
    "NvmeWearHigh": (
        [('inferd_nvme_percentage_used{device="nvme0n1"}', "85x3")],
        [('inferd_nvme_percentage_used{device="nvme0n1"}', "10x3")],
        "1m",
        {"device": "nvme0n1"},
    ),
    "NvmeMediaErrors": (
        [('inferd_nvme_media_errors{device="nvme0n1"}', "1x3")],
        [('inferd_nvme_media_errors{device="nvme0n1"}', "0x3")],
        "1m",
        {"device": "nvme0n1"},
    ),
    "VolumeSpaceLow": (
        [
            ('node_filesystem_avail_bytes{mountpoint="/var/lib/inferd/models",instance="h:9100"}', "5x20"),
            ('node_filesystem_size_bytes{mountpoint="/var/lib/inferd/models",instance="h:9100"}', "100x20"),
        ],
        [  # low space on a volume the rule does not watch, plenty on the one it does
            ('node_filesystem_avail_bytes{mountpoint="/tmp",instance="h:9100"}', "1x20"),
            ('node_filesystem_size_bytes{mountpoint="/tmp",instance="h:9100"}', "100x20"),
            ('node_filesystem_avail_bytes{mountpoint="/var/lib/inferd/models",instance="h:9100"}', "50x20"),
            ('node_filesystem_size_bytes{mountpoint="/var/lib/inferd/models",instance="h:9100"}', "100x20"),
        ],
        "15m",
        {"instance": "h:9100", "mountpoint": "/var/lib/inferd/models"},
    ),
}


def expand(text: str, labels: dict, value: str) -> str:
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
    return text.replace("{{ $value }}", value)


def test_every_alert_has_a_promtool_case(rules):
    assert set(all_alert_exprs(rules)) == set(CASES)


def test_promtool_unit_tests_fire_and_stay_quiet(rules, tmp_path):
    doc = yaml.safe_load(rules.read_text())
    by_name = {r["alert"]: r for r in doc["groups"][0]["rules"]}
    tests = []
    for name, (bad, good, at, labels) in CASES.items():
        rule = by_name[name]
        series = [s if isinstance(s, dict) else {"series": s[0], "values": s[1]} for s in bad]
        value = next((s["values"].split("x")[0] for s in series if "nvme" in s["series"]), "")
        firing = {
            "exp_labels": {**labels, "severity": rule["labels"]["severity"]},
            "exp_annotations": {k: expand(v, labels, value) for k, v in rule["annotations"].items()},
        }
        tests.append(
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": [firing]}],
            }
        )
        quiet = [s if isinstance(s, dict) else {"series": s[0], "values": s[1]} for s in good]
        tests.append(
            {"interval": "1m", "input_series": quiet, "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}]}
        )
    shutil.copy(rules, tmp_path / "inferd.yml")
    (tmp_path / "alerts.test.yml").write_text(
        yaml.safe_dump({"rule_files": ["inferd.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    r = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_public_listen_addresses_are_refused(tmp_path):
    play = tmp_path / "play.yml"
    play.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [{"ansible.builtin.import_tasks": f"{ROOT}/roles/monitoring/tasks/preflight.yml"}],
                }
            ]
        )
    )
    base = [
        str(ANSIBLE) + "-playbook",
        "-i",
        "localhost,",
        "-c",
        "local",
        str(play),
        "-e",
        f"@{ROOT}/roles/monitoring/defaults/main.yml",
    ]
    r = subprocess.run(
        [*base, "-e", "monitoring_prometheus_listen_address=0.0.0.0:9090"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode != 0 and "listens on all interfaces" in r.stdout
    r = subprocess.run(
        [*base, "-e", "monitoring_prometheus_listen_address=0.0.0.0:9090", "-e", '{"monitoring_allow_public_listen": true}'],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout
