"""Which in-place method the release role picks (roles/release/vars/main.yml `_release_swap`): a
weight swap when only the model changes and an admin key can call the route, never under tensor
parallelism (the runtime refuses it there: the copy would reach rank 0's shard only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROLE = ROOT / "roles/release"

CASES = {
    "model-only": ({}, True),
    "tensor-parallel": ({"inference_runtime_tensor_parallel_size": 2}, False),
    "new-runtime": ({"_release_new": {"runtime_dir": "/opt/r2", "model_version": "m2"}}, False),
    "no-admin-key": ({"inference_runtime_api_keys": [{"name": "u", "role": "user", "key": "k" * 40}]}, False),
    "restart-asked": ({"release_in_place_method": "restart"}, False),
}


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swap-choice")
    base = {
        **yaml.safe_load((ROLE / "defaults/main.yml").read_text()),
        **yaml.safe_load((ROLE / "vars/main.yml").read_text()),
        "inference_runtime_api_keys": [
            {"name": "a", "role": "admin", "key": "a" * 40},
            {"name": "u", "role": "user", "key": "u" * 40},
        ],
        "inference_runtime_metrics_token": "",
        "_release_new": {"runtime_dir": "/opt/r1", "model_version": "m2"},
        "_release_serving": {"runtime_dir": "/opt/r1", "model_version": "m1"},
    }
    hosts = {name: {**base, **extra, "ansible_connection": "local"} for name, (extra, _) in CASES.items()}
    (tmp / "inventory.json").write_text(json.dumps({"all": {"hosts": hosts}}))
    (tmp / "play.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.copy:\n"
        '        content: "{{ _release_swap | bool }}"\n'
        '        dest: "' + str(tmp) + '/{{ inventory_hostname }}"\n'
        "      delegate_to: localhost\n"
    )
    r = subprocess.run(
        [BIN / "ansible-playbook", "-i", tmp / "inventory.json", tmp / "play.yml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "HOME": str(tmp)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return {name: (tmp / name).read_text() == "True" for name in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_in_place_method(chosen, case):
    assert chosen[case] is CASES[case][1]
