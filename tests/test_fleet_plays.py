"""On a fleet, the plays that restart what serves (the driver play may reboot, the runtime restarts,
nginx reloads) change one batch of hosts at a time and stop the rollout at the first failure; and
the shipped ansible.cfg checks SSH host keys."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVING = {"playbooks/gpu.yml": "nvidia_driver", "playbooks/runtime.yml": "inference_runtime", "playbooks/gateway.yml": "gateway"}


@pytest.mark.parametrize("playbook, role", SERVING.items())
def test_serving_plays_roll_a_batch_at_a_time_and_stop_at_the_first_failure(playbook, role):
    plays = [p for p in yaml.safe_load((ROOT / playbook).read_text()) if "roles" in p]
    (play,) = [p for p in plays if role in [r["role"] for r in p["roles"]]]
    assert play["serial"] == "{{ inferd_serial | default(1) }}"
    assert play["max_fail_percentage"] == 0


def test_ansible_cfg_checks_ssh_host_keys():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "ansible.cfg")
    assert cfg.getboolean("defaults", "host_key_checking", fallback=True) is True


@pytest.mark.parametrize("inventory", ["inventory/demo/hosts.yml", "molecule/site/molecule.yml"])
def test_the_test_inventories_need_no_ssh(inventory):
    # Their hosts are podman containers: host key checking does not apply to them.
    text = (ROOT / inventory).read_text()
    assert "containers.podman.podman" in text or "driver:\n  name: podman" in text
