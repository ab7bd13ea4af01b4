"""playbooks/upgrade.yml and rollback.yml refuse before anything changes (issue 19): nothing to
upgrade to, a package older than the serving one, a runtime wheelhouse that does not install on the
host's Python, a rollback with no previous release. Run against this machine (inventory/device),
with the release layout in a temporary directory; every refusal names the cause and leaves that
directory exactly as it was."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_playbook_refusals import PLATFORMS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Packed after this (2033): any package made now is older than the serving one.
SERVING_CREATED = 2_000_000_000
PY = sys.version_info


@pytest.fixture
def host(tmp_path):
    """A host where release r1 serves (runtime 0.5.0, a package from 2033) and nothing served before."""
    opt = tmp_path / "opt"
    (opt / "releases").mkdir(parents=True)
    r1 = {
        "id": "r1",
        "seq": 1,
        "model_dir": str(tmp_path / "models/aaaa-plain"),
        "model_package_dir": "",
        "model_version": "sha256:" + "a" * 64,
        "model_created": SERVING_CREATED,
        "runtime_version": "0.5.0",
        "runtime_dir": str(opt),
        "runtime_wheel": "",
        "adopted": True,
    }
    state = {"serving": "r1", "previous": None, "serving_colour": "blue", "units": {"blue": "inferd"}, "releases": [r1]}
    (opt / "releases/state.json").write_text(json.dumps(state))
    return tmp_path


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def run(host: Path, playbook: str, **extra) -> subprocess.CompletedProcess:
    variables = {
        # The platform preflight's facts replace all of this machine's: its Python is added back.
        "ansible_facts": {
            **PLATFORMS["Debian 12"],
            "python": {"version": {"major": sys.version_info.major, "minor": sys.version_info.minor}},
        },
        "inference_runtime_install_dir": str(host / "opt"),
        "inference_runtime_model_dir": str(host / "models/current"),
        "inference_runtime_model_require_signature": False,
        **extra,
    }
    cmd = [str(BIN / "ansible-playbook"), "-i", "inventory/device", playbook, "-e", json.dumps(variables)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def refused(host: Path, playbook: str, **extra) -> str:
    before = snapshot(host)
    r = run(host, playbook, **extra)
    assert r.returncode != 0, r.stdout
    assert snapshot(host) == before, "a refused upgrade changed the release layout"
    return r.stdout


def test_an_upgrade_to_nothing_is_refused(host):
    out = refused(host, "playbooks/upgrade.yml")
    assert "Nothing to upgrade to: set release_model_src" in out


def test_a_package_older_than_the_serving_one_is_refused_unless_asked(host, tmp_path):
    src, pkg = tmp_path / "model", tmp_path / "packed"
    src.mkdir()
    (src / "config.json").write_text("{}")
    r = subprocess.run([str(BIN / "inferd"), "pack", str(src), str(pkg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = refused(host, "playbooks/upgrade.yml", release_model_src=str(pkg))
    assert "Refused: a downgrade (a package older than the serving one). Nothing was changed." in out
    assert "release_allow_downgrade: true" in out


def test_a_runtime_that_does_not_install_on_the_hosts_python_is_refused(host, tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    # A runtime wheel whose dependency the wheelhouse lacks: pip cannot resolve it for the host.
    with zipfile.ZipFile(wheelhouse / "inferd-9.0.0-py3-none-any.whl", "w") as z:
        z.writestr(
            "inferd-9.0.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: inferd\nVersion: 9.0.0\nRequires-Dist: torch\n"
        )
        z.writestr(
            "inferd-9.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr("inferd-9.0.0.dist-info/RECORD", "")
    out = refused(host, "playbooks/upgrade.yml", release_wheelhouse=str(wheelhouse))
    assert f"The wheelhouse {wheelhouse} does not install on the host's Python" in out
    assert "torch" in out


def test_a_rollback_without_a_previous_release_is_refused(host):
    out = refused(host, "playbooks/rollback.yml")
    assert "There is no previous release to roll back to (r1 is the first one" in out
