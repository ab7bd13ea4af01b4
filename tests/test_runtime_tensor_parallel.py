"""The runtime role's tensor parallelism: the unit sees every GPU the release needs (device
allow-list and CUDA_VISIBLE_DEVICES from inference_runtime_nvidia_devices) with NCCL's settings,
the config carries the size, and the preflight refuses a size without as many GPUs. One
ansible-playbook run renders the role's templates for two hosts and runs the preflight on a third."""

from __future__ import annotations

import pytest
import yaml
from runtime_role import LOCAL, preflight_play, render_play, role_vars, run_playbook

# Given as the facts playbooks/assess.yml publishes, so no assessment runs.
ASSESSED = {"gpu_assess_numa_node": "0", "gpu_assess_local_cpus": "0-51", "gpu_assess_recommended_quantization": "bf16"}
TWO_GPUS = ["/dev/nvidia0", "/dev/nvidia1"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render-tp")
    cuda = {"inference_runtime_device": "cuda", **ASSESSED}
    inventory = {
        "all": {
            "vars": {**role_vars(), **LOCAL},
            "children": {
                "render": {
                    "hosts": {
                        "tp2": {
                            **cuda,
                            "inference_runtime_nvidia_devices": TWO_GPUS,
                            "inference_runtime_tensor_parallel_size": 2,
                        },
                        "tp1": {**cuda, "inference_runtime_nvidia_devices": ["/dev/nvidia3"]},
                    }
                },
                "refuse": {
                    "hosts": {
                        "tp2_one_gpu": {
                            **cuda,
                            "inference_runtime_nvidia_devices": ["/dev/nvidia0"],
                            "inference_runtime_tensor_parallel_size": 2,
                        }
                    }
                },
            },
        }
    }
    plays = [render_play("render", tmp), preflight_play("Run the role's preflight", "refuse")]
    return tmp, run_playbook(tmp, inventory, plays)


def lines(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def test_a_two_gpu_unit_sees_both_gpus_with_nccl_settings(rendered):
    tmp, r = rendered
    unit = (tmp / "tp2-inferd.service").read_text()
    assert {f"{d} rw" for d in TWO_GPUS} <= set(lines(unit, "DeviceAllow")), r.stdout[-3000:]
    env = lines(unit, "Environment")
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1" in env
    assert "NCCL_SOCKET_IFNAME=lo" in env and "NCCL_IB_DISABLE=1" in env
    assert "AF_NETLINK" in lines(unit, "RestrictAddressFamilies")[0]
    assert yaml.safe_load((tmp / "tp2-config.yaml").read_text())["tensor_parallel_size"] == 2


def test_a_one_gpu_unit_sees_its_gpu_and_no_nccl(rendered):
    tmp, _ = rendered
    unit = (tmp / "tp1-inferd.service").read_text()
    env = lines(unit, "Environment")
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=3" in env
    assert not any(e.startswith("NCCL_") for e in env)
    assert "AF_NETLINK" not in lines(unit, "RestrictAddressFamilies")[0]
    assert yaml.safe_load((tmp / "tp1-config.yaml").read_text())["tensor_parallel_size"] == 1


def test_the_preflight_refuses_a_size_without_as_many_gpus(rendered):
    _, r = rendered
    assert r.returncode != 0
    assert "inference_runtime_tensor_parallel_size is 2" in r.stdout and "(it lists 1)" in r.stdout, r.stdout[-3000:]
