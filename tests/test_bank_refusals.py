"""The settings that used to stop `ansible-playbook site.yml -i inventory/bank` half-way (issue 18),
each refused before anything is installed, with the fix named; and the bank inventory as shipped
clears them. Plays run against this machine (inventory/device) with the inventory's values given as
extra vars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
H200_XML = ROOT / "tests/modules/fixtures/nvidia-smi-q-h200.xml"
VAULT_PASSWORD = "inferd-example-vault"


def play(playbook: str, *args: str, env: dict | None = None, **extra) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ansible-playbook"), "-i", "inventory/device", playbook, *args]
    for k, v in extra.items():
        cmd += ["-e", json.dumps({k: v})]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def bank_vars(tmp_path_factory) -> dict:
    """The bank inventory's settings for its example host, as Ansible resolves them."""
    pw = tmp_path_factory.mktemp("vault") / "pw"
    pw.write_text(VAULT_PASSWORD + "\n")
    cmd = [str(BIN / "ansible-inventory"), "-i", "inventory/bank", "--host", "gpu01.bank.example"]
    cmd += ["--vault-password-file", str(pw)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(r.stdout)


def gpu_env(tmp_path: Path, cuda_version: str | None) -> dict:
    """PATH with an `nvidia-smi` that reports the lent H200 with the given CUDA release, or one that
    fails as it does before the driver is loaded (cuda_version None)."""
    smi = tmp_path / "fake-bin" / "nvidia-smi"
    smi.parent.mkdir(exist_ok=True)
    if cuda_version is None:
        smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no NVIDIA driver loaded.'\nexit 9\n")
    else:
        xml = tmp_path / "smi.xml"
        recorded = "<cuda_version>13.0</cuda_version>"
        xml.write_text(H200_XML.read_text().replace(recorded, f"<cuda_version>{cuda_version}</cuda_version>"))
        smi.write_text(f'#!/bin/sh\ncase "$1" in\n  --query-gpu=*) echo "00000000:00:06.0, 9.0" ;;\n  *) cat {xml} ;;\nesac\n')
    smi.chmod(0o755)
    # No NVML either: the module falls back to nvidia-smi.
    return dict(os.environ, PATH=f"{smi.parent}:{BIN}:/usr/bin:/bin", LD_LIBRARY_PATH="/nonexistent")


def wheelhouse(tmp_path: Path, wheel: str) -> str:
    d = tmp_path / "wheelhouse"
    d.mkdir(exist_ok=True)
    (d / wheel).touch()
    return str(d)


TORCH_CU130 = "torch-2.11.0+cu130-cp312-cp312-manylinux_2_28_x86_64.whl"


# ---- the model disk's label ----------------------------------------------------------------------


def test_preflight_refuses_a_label_longer_than_xfs_takes():
    r = play("playbooks/preflight.yml", model_storage_device="/dev/nvme1n1", model_storage_fstype="xfs")
    assert r.returncode != 0
    assert "model_storage_label 'inferd-models' (13 characters) cannot label a xfs filesystem" in r.stdout
    assert "Set model_storage_label to a shorter name" in r.stdout


def test_preflight_takes_the_same_label_on_ext4_and_a_short_one_on_xfs():
    r = play("playbooks/preflight.yml", model_storage_device="/dev/nvme1n1", model_storage_fstype="ext4")
    assert r.returncode == 0, r.stdout
    short = dict(model_storage_fstype="xfs", model_storage_label="inferd-model")
    r = play("playbooks/preflight.yml", model_storage_device="/dev/nvme1n1", **short)
    assert r.returncode == 0, r.stdout


def test_bank_inventory_label_fits_its_filesystem(bank_vars):
    r = play(
        "playbooks/preflight.yml",
        model_storage_device=bank_vars["model_storage_device"],
        model_storage_fstype=bank_vars["model_storage_fstype"],
        model_storage_label=bank_vars["model_storage_label"],
    )
    assert r.returncode == 0, r.stdout


# ---- the driver branch against the wheelhouse's CUDA release -------------------------------------


def test_preflight_refuses_a_driver_branch_older_than_the_wheelhouse_cuda(tmp_path):
    wh = wheelhouse(tmp_path, TORCH_CU130)
    r = play("playbooks/preflight.yml", inference_runtime_wheelhouse=wh, nvidia_driver_branch="550")
    assert r.returncode != 0
    assert "nvidia_driver_branch 550 cannot run the wheelhouse's torch, built for CUDA 13.0" in r.stdout
    assert 'CUDA 13.x needs driver branch 580 or newer. Set nvidia_driver_branch to "580"' in r.stdout
    r = play("playbooks/preflight.yml", inference_runtime_wheelhouse=wh, nvidia_driver_branch="580")
    assert r.returncode == 0, r.stdout
    assert "driver branch 580 runs CUDA 13.0" in r.stdout


def test_preflight_reads_the_cuda_release_from_pypi_style_runtime_wheels(tmp_path):
    wh = wheelhouse(tmp_path, "nvidia_cuda_runtime_cu12-12.8.90-py3-none-manylinux2014_x86_64.whl")
    r = play("playbooks/preflight.yml", inference_runtime_wheelhouse=wh, nvidia_driver_branch="470")
    assert r.returncode != 0
    assert "built for CUDA 12.8" in r.stdout and "needs driver branch 525 or newer" in r.stdout


def test_bank_inventory_driver_branch_runs_cuda_13(bank_vars, tmp_path):
    assert bank_vars["nvidia_driver_manage"] is True
    r = play(
        "playbooks/preflight.yml",
        inference_runtime_wheelhouse=wheelhouse(tmp_path, TORCH_CU130),
        nvidia_driver_branch=bank_vars["nvidia_driver_branch"],
    )
    assert r.returncode == 0, r.stdout


def test_assess_stops_where_the_running_driver_is_older_than_the_wheelhouse_cuda(tmp_path):
    # The branch passes the preflight; the driver actually running reports CUDA 12.4 (site.yml's
    # second assessment: the one after the driver play).
    wh = wheelhouse(tmp_path, TORCH_CU130)
    after = dict(inference_runtime_wheelhouse=wh, nvidia_driver_branch="580", _assess_before_driver=False)
    r = play("playbooks/preflight.yml", "playbooks/assess.yml", env=gpu_env(tmp_path, "12.4"), **after)
    assert r.returncode != 0
    assert "Driver 580.159.04 runs CUDA up to 12.4, but the wheelhouse's torch is built for CUDA 13.0" in r.stdout
    r = play("playbooks/preflight.yml", "playbooks/assess.yml", env=gpu_env(tmp_path, "13.0"), **after)
    assert r.returncode == 0, r.stdout
    assert "runs the wheelhouse's CUDA 13.0" in r.stdout


# ---- the GPU requirement on a bare host ------------------------------------------------------------


def test_site_checks_the_gpu_requirement_after_the_driver_play_on_a_bare_host(tmp_path):
    # No driver loaded yet: the first assessment goes on, the second (after the driver play, here
    # skipped by the tags) stops the run with what to do.
    r = play("site.yml", "--tags", "assess", env=gpu_env(tmp_path, None), assess_require_gpu=True)
    assert r.returncode != 0
    assert "No GPU visible yet: the driver play installs branch" in r.stdout
    assert "The driver play has run: if it installed the driver just now, reboot the host" in r.stdout
    assert sum(line.startswith("PLAY [Assess the GPUs") for line in r.stdout.splitlines()) == 2


def test_assess_stops_at_once_where_the_driver_is_not_managed_here(tmp_path):
    r = play("site.yml", "--tags", "assess", env=gpu_env(tmp_path, None), assess_require_gpu=True, nvidia_driver_manage=False)
    assert r.returncode != 0
    assert "No GPU visible yet" not in r.stdout and "The driver play has run" not in r.stdout
    assert "set assess_require_gpu: false" in r.stdout
    assert sum(line.startswith("PLAY [Assess the GPUs") for line in r.stdout.splitlines()) == 1


# ---- the model's signer ----------------------------------------------------------------------------


def test_bank_inventory_names_the_model_signers_public_key(bank_vars):
    # The key itself is the bank's (files/, from its signing ceremony); the inventory must wire it.
    assert "inference_runtime_model_public_key" in bank_vars
    assert "files/model-signing.pub" in bank_vars["inference_runtime_model_public_key"]
