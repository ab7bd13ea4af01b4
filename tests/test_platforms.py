"""The supported platforms are said once (playbooks/preflight.yml) and enforced before anything
changes: site.yml and every playbook that changes a host import the preflight first, every role's
meta/main.yml lists the same platforms, and NVIDIA's CUDA repository directory is known for each
(the mapping is checked here, and rendered by the nvidia_driver role for a faked Ubuntu 24.04 arm64
host). The refusal itself runs in tests/test_playbook_refusals.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFLIGHT = yaml.safe_load((ROOT / "playbooks/preflight.yml").read_text())
PLATFORMS = PREFLIGHT[0]["vars"]["_preflight_platforms"]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if (p / "meta/main.yml").exists())


def test_the_supported_platforms():
    said = {(p["distribution"], p["version"], p["release"]) for p in PLATFORMS}
    assert said == {("Debian", "12", "bookworm"), ("Ubuntu", "22.04", "jammy"), ("Ubuntu", "24.04", "noble")}
    assert "always" in PREFLIGHT[0]["tags"], "the platform check must run under any --tags"


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name)
def test_every_role_lists_the_supported_platforms(role: Path):
    meta = yaml.safe_load((role / "meta/main.yml").read_text())["galaxy_info"]["platforms"]
    listed = {p["name"]: sorted(p["versions"]) for p in meta}
    supported: dict = {}
    for p in PLATFORMS:
        supported.setdefault(p["distribution"], []).append(p["release"])
    assert listed == {k: sorted(v) for k, v in supported.items()}, f"{role.name}: meta/main.yml platforms differ"


def first_import(playbook: Path) -> str | None:
    first = yaml.safe_load(playbook.read_text())[0]
    return first.get("ansible.builtin.import_playbook") or first.get("import_playbook")


def test_site_checks_the_platform_first():
    assert first_import(ROOT / "site.yml") == "playbooks/preflight.yml"


@pytest.mark.parametrize(
    "playbook",
    [p for p in sorted((ROOT / "playbooks").glob("*.yml")) if any(play.get("become") for play in yaml.safe_load(p.read_text()))],
    ids=lambda p: p.name,
)
def test_every_playbook_that_changes_a_host_checks_the_platform_first(playbook: Path):
    assert first_import(playbook) == "preflight.yml", f"{playbook.name} does not import preflight.yml first"


def test_nvidia_cuda_repository_directory_for_each_supported_release():
    mapping = yaml.safe_load((ROOT / "roles/nvidia_driver/vars/main.yml").read_text())
    dirs = mapping["_nvidia_driver_cuda_repo_dirs"]
    # NVIDIA names them distribution + version without dots: debian12, ubuntu2204, ubuntu2404.
    assert dirs == {p["release"]: p["distribution"].lower() + p["version"].replace(".", "") for p in PLATFORMS}
    assert mapping["_nvidia_driver_cuda_repo_archs"] == {"x86_64": "x86_64", "aarch64": "sbsa"}


def run_driver_preflight(tmp_path: Path, facts: dict) -> subprocess.CompletedProcess:
    play = tmp_path / "driver-preflight.yml"
    play.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Choose the CUDA repository line",
                    "hosts": "gpu_servers",
                    "gather_facts": False,
                    "tasks": [
                        {"ansible.builtin.include_role": {"name": "nvidia_driver", "tasks_from": "preflight"}},
                        {"ansible.builtin.debug": {"msg": "line={{ _nvidia_driver_apt_repo }}"}},
                    ],
                }
            ]
        )
    )
    extra = {
        "ansible_facts": facts,
        "nvidia_driver_cuda_repo_url": "https://mirror.example/compute/cuda/repos/",
        "nvidia_driver_apt_key_src": str(tmp_path / "key.asc"),
    }
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "inventory/device", str(play), "-e", json.dumps(extra)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "HOME": str(tmp_path)},
    )


def test_nvidia_driver_writes_the_line_for_the_hosts_release_and_architecture(tmp_path):
    noble_arm = {
        "distribution": "Ubuntu",
        "distribution_release": "noble",
        "distribution_version": "24.04",
        "architecture": "aarch64",
    }
    r = run_driver_preflight(tmp_path, noble_arm)
    assert r.returncode == 0, r.stdout + r.stderr
    want = "deb [signed-by=/etc/apt/keyrings/nvidia-driver.asc] https://mirror.example/compute/cuda/repos/ubuntu2404/sbsa/ /"
    assert f"line={want}" in r.stdout
    focal = {"distribution": "Ubuntu", "distribution_release": "focal", "distribution_version": "20.04", "architecture": "x86_64"}
    r = run_driver_preflight(tmp_path, focal)
    assert r.returncode != 0
    assert "no directory of NVIDIA's CUDA repository is known here for Ubuntu focal" in r.stdout
