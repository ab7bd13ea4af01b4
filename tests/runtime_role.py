"""One ansible-playbook run against the inference_runtime role on this machine, for the tests that
render its templates and run its preflight for inventories of local hosts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROLE = ROOT / "roles/inference_runtime"
LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}


def role_vars() -> dict:
    """The role's defaults and its vars, as the role itself would see them."""
    return {
        **yaml.safe_load((ROLE / "defaults/main.yml").read_text()),
        **yaml.safe_load((ROLE / "vars/main.yml").read_text()),
    }


def render_play(hosts: str, dest: Path) -> dict:
    """Renders the unit and config.yaml of each host to dest/<host>-<template>."""
    return {
        "name": "Render the runtime's templates",
        "hosts": hosts,
        "gather_facts": False,
        "tasks": [
            {
                "ansible.builtin.template": {
                    "src": f"{ROLE}/templates/{{{{ item }}}}.j2",
                    "dest": f"{dest}/{{{{ inventory_hostname }}}}-{{{{ item }}}}",
                    "mode": "0600",
                },
                "loop": ["inferd.service", "config.yaml"],
            }
        ],
    }


def preflight_play(name: str, hosts: str) -> dict:
    return {
        "name": name,
        "hosts": hosts,
        "gather_facts": False,
        "tasks": [{"ansible.builtin.include_role": {"name": "inference_runtime", "tasks_from": "preflight"}}],
    }


def run_playbook(tmp: Path, inventory: dict, plays: list[dict], path: str = "") -> subprocess.CompletedProcess:
    """Writes the inventory and plays under tmp and runs them; path goes in front of PATH."""
    (tmp / "inventory.yml").write_text(yaml.safe_dump(inventory))
    play = tmp / "play.yml"
    play.write_text(yaml.safe_dump(plays))
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(tmp / "inventory.yml"), str(play)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": f"{path}{BIN}:/usr/bin:/bin", "HOME": str(tmp), "ANSIBLE_ROLES_PATH": str(ROOT / "roles")},
    )
