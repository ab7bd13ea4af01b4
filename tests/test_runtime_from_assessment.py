"""What gpu_assess finds is used: the runtime's config.yaml and unit take the precision, CPUs and
NUMA node from the assessment where the inventory leaves them empty, on GPU hosts only. One
ansible-playbook run: playbooks/assess.yml against a host whose nvidia-smi answers as the H200 did
(70B at bf16 does not fit, fp8 does), then the role's own templates rendered for it and for hosts
given other assessments and pins; and the role's preflight refusing a GPU host without an
assessment."""

from __future__ import annotations

import pytest
import yaml
from runtime_role import LOCAL, ROOT, preflight_play, render_play, role_vars, run_playbook

ASSESSED = {"gpu_assess_numa_node": "1", "gpu_assess_local_cpus": "52-103,156-207", "gpu_assess_recommended_quantization": "fp8"}
HOSTS = {
    # host: (host vars, expected quantization, expected CPUAffinity, expected NUMAMask)
    "assessed": (
        {"inference_runtime_device": "cuda", "inference_runtime_nvidia_devices": ["/dev/nvidia0"], **ASSESSED},
        "fp8",
        "52-103,156-207",
        "1",
    ),
    "node0_bf16": (
        {
            "inference_runtime_device": "cuda",
            "gpu_assess_numa_node": "0",
            "gpu_assess_local_cpus": "0-51",
            "gpu_assess_recommended_quantization": "bf16",
        },
        None,
        "0-51",
        "0",
    ),
    "pinned": (
        {
            "inference_runtime_device": "cuda",
            **ASSESSED,
            "inference_runtime_quantization": "none",
            "inference_runtime_cpu_affinity": "0-3",
            "inference_runtime_numa_node": "none",
        },
        None,
        "0-3",
        None,
    ),
    "cpu_device": ({"inference_runtime_device": "cpu", **ASSESSED}, None, None, None),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    smi = tmp / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    xml = ROOT / "tests/modules/fixtures/nvidia-smi-q-h200.xml"
    smi.write_text(f'#!/bin/sh\ncase "$1" in --query-gpu=*) echo "00000000:00:06.0, 9.0" ;; *) cat {xml} ;; esac\n')
    smi.chmod(0o755)
    seventy_b = {
        "assess_params_billion": 70.55,
        "assess_kv_bytes_per_token": 327680,
        "assess_context_length": 4096,
        "assess_concurrency": 1,
    }
    inventory = {
        "all": {
            "vars": {**role_vars(), **LOCAL},
            "children": {
                # Assessed for real (the role's defaults leave all three to the assessment).
                "gpu_servers": {
                    "hosts": {
                        "h200": {"inference_runtime_device": "cuda", **seventy_b},
                        # Pinned to 16-bit serving while the inventory's assess_dtype says fp8: assessed
                        # as served (bf16), so it does not fit.
                        "h200_pinned_none": {
                            "inference_runtime_device": "cuda",
                            "inference_runtime_quantization": "none",
                            "assess_dtype": "fp8",
                            **seventy_b,
                        },
                    }
                },
                # Assessments given as the facts assess.yml publishes.
                "given": {"hosts": {name: hostvars for name, (hostvars, *_) in HOSTS.items()}},
                "unassessed": {"hosts": {"no_assessment": {"inference_runtime_device": "cuda"}}},
            },
        }
    }
    plays = [
        {"ansible.builtin.import_playbook": str(ROOT / "playbooks/assess.yml")},
        render_play("gpu_servers:given", tmp),
        preflight_play("Run the role's preflight without an assessment", "unassessed"),
    ]
    return tmp, run_playbook(tmp, inventory, plays, path=f"{smi.parent}:")


def unit_line(text: str, key: str) -> str | None:
    return next((line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")), None)


def test_the_assessment_chooses_fp8_where_bf16_does_not_fit(rendered):
    tmp, r = rendered
    config = yaml.safe_load((tmp / "h200-config.yaml").read_text())
    assert config["quantization"] == "fp8", r.stdout


@pytest.mark.parametrize("host", HOSTS)
def test_templates_take_what_the_inventory_leaves_to_the_assessment(rendered, host):
    tmp, r = rendered
    _, quantization, cpus, numa = HOSTS[host]
    unit = (tmp / f"{host}-inferd.service").read_text()
    config = yaml.safe_load((tmp / f"{host}-config.yaml").read_text())
    assert config.get("quantization") == quantization
    assert unit_line(unit, "CPUAffinity") == cpus
    assert unit_line(unit, "NUMAMask") == numa
    assert (unit_line(unit, "NUMAPolicy") == "bind") == (numa is not None)


def test_a_gpu_host_without_an_assessment_is_refused(rendered):
    _, r = rendered
    assert "no_assessment" in r.stdout and "left to the GPU assessment, which has not run in this play" in r.stdout
    recap = {line.split()[0]: line for line in r.stdout.split("PLAY RECAP")[1].splitlines() if ":" in line}
    assert "failed=1" in recap["no_assessment"]
    assert all("failed=0" in recap[host] for host in [*HOSTS, "h200"]), recap


def test_a_cuda_unit_allows_the_control_devices_cuda_opens(rendered):
    tmp, _ = rendered
    allowed = [line for line in (tmp / "assessed-inferd.service").read_text().splitlines() if line.startswith("DeviceAllow=")]
    expected = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
    assert allowed == [f"DeviceAllow={d} rw" for d in expected]
    cpu_unit = (tmp / "cpu_device-inferd.service").read_text()
    assert "DevicePolicy=closed" in cpu_unit and "DeviceAllow=" not in cpu_unit


def test_a_pinned_precision_is_assessed_as_served(rendered):
    _, r = rendered
    recap = {line.split()[0]: line for line in r.stdout.split("PLAY RECAP")[1].splitlines() if ":" in line}
    assert "failed=1" in recap["h200_pinned_none"], r.stdout
