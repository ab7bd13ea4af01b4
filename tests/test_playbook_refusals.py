"""Refusals that happen before any host is changed: a wrong vault password for the bank inventory,
a model that gpu_assess says does not fit (the assess play run against this machine, whose
`nvidia-smi` answers with the XML recorded on the lent H200), and a host whose distribution or
version inferd does not support (this machine's facts replaced by another platform's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_bank_inventory_opens_with_its_example_vault_password_only(tmp_path):
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text("inferd-example-vault\n")
    wrong.write_text("not-the-password\n")
    cmd = [str(BIN / "ansible-inventory"), "-i", "inventory/bank", "--list", "--vault-password-file"]
    ok = subprocess.run([*cmd, str(right)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "vault_inferd_metrics_token" in ok.stdout and "sk-inferd-EXAMPLE-user" in ok.stdout
    bad = subprocess.run([*cmd, str(wrong)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0
    assert "Decryption failed (no vault secrets were found that could decrypt)" in bad.stderr


def run_assess(env: dict, **extra) -> subprocess.CompletedProcess:
    args = [str(BIN / "ansible-playbook"), "-i", "inventory/device", "playbooks/assess.yml"]
    for k, v in extra.items():
        args += ["-e", f"{k}={v}"]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)


SEVENTY_B = dict(assess_params_billion=70.55, assess_kv_bytes_per_token=327680, assess_context_length=4096, assess_concurrency=1)


def test_assess_stops_the_play_when_the_pinned_precision_does_not_fit(fake_nvidia_smi):
    r = run_assess(fake_nvidia_smi("9.0"), assess_dtype="bf16", inference_runtime_quantization="none", **SEVENTY_B)
    assert r.returncode != 0
    assert "does NOT fit" in r.stdout and "Use quantization fp8" in r.stdout and "NVIDIA H200" in r.stdout
    r = run_assess(fake_nvidia_smi("9.0"), assess_dtype="fp8", **SEVENTY_B)
    assert r.returncode == 0, r.stdout
    assert "fits; lowest-loss quantization that fits: fp8" in r.stdout


def test_assess_takes_fp8_where_bf16_does_not_fit_and_the_gpu_has_it_else_int8(fake_nvidia_smi):
    # Quantization left to the assessment (the device inventory does not set it): fp8 is taken.
    r = run_assess(fake_nvidia_smi("9.0"), assess_dtype="bf16", **SEVENTY_B)
    assert r.returncode == 0, r.stdout
    assert "does NOT fit; lowest-loss quantization that fits: fp8" in r.stdout and "precision fp8" in r.stdout
    # The same memory on a GPU without fp8 but with int8 (compute capability 8.0, an A100): int8 weights.
    r = run_assess(fake_nvidia_smi("8.0"), assess_dtype="bf16", **SEVENTY_B)
    assert r.returncode == 0, r.stdout
    assert "lowest-loss quantization that fits: int8_weight_only" in r.stdout and "precision int8_weight_only" in r.stdout
    # Without either (compute capability 7.0): nothing the runtime serves fits.
    r = run_assess(fake_nvidia_smi("7.0"), assess_dtype="bf16", **SEVENTY_B)
    assert r.returncode != 0
    assert "no quantization fits one GPU" in r.stdout and "compute capability 7.0" in r.stdout
    assert "Use a larger GPU" in r.stdout


PLATFORMS = {
    "RedHat 9": {"distribution": "RedHat", "distribution_version": "9.4", "distribution_release": "Plow"},
    "Ubuntu 20.04": {"distribution": "Ubuntu", "distribution_version": "20.04", "distribution_release": "focal"},
    "Debian 12": {"distribution": "Debian", "distribution_version": "12.11", "distribution_release": "bookworm"},
    "Ubuntu 22.04": {"distribution": "Ubuntu", "distribution_version": "22.04", "distribution_release": "jammy"},
    "Ubuntu 24.04": {"distribution": "Ubuntu", "distribution_version": "24.04", "distribution_release": "noble"},
}


def run_claiming(platform: str, playbook: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a playbook against this machine with its distribution facts replaced by `platform`'s."""
    facts = json.dumps({"ansible_facts": PLATFORMS[platform]})
    cmd = [str(BIN / "ansible-playbook"), "-i", "inventory/device", playbook, "-e", facts, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize("platform", ["RedHat 9", "Ubuntu 20.04"])
def test_site_refuses_an_unsupported_platform_before_anything_changes(platform, fake_nvidia_smi):
    # Whatever tags are chosen: here only the tuning role's, which used to change a RHEL host.
    r = run_claiming(platform, "site.yml", "--tags", "gpu_host_tuning", env=fake_nvidia_smi("9.0"))
    assert r.returncode != 0
    facts = PLATFORMS[platform]
    found = f"runs {facts['distribution']} {facts['distribution_version']} ({facts['distribution_release']})"
    assert found in r.stdout and "which inferd does not support" in r.stdout
    assert "Supported: Debian 12 (bookworm), Ubuntu 22.04 (jammy), Ubuntu 24.04 (noble)" in r.stdout
    # The preflight was the only play that ran: neither the assessment nor the tuning role did.
    plays = [line for line in r.stdout.splitlines() if line.startswith("PLAY [")]
    assert len(plays) == 1 and "Refuse an unsupported platform" in plays[0], plays
    assert "changed=0" in r.stdout.split("PLAY RECAP")[1]


@pytest.mark.parametrize("platform", ["Debian 12", "Ubuntu 22.04", "Ubuntu 24.04"])
def test_preflight_accepts_the_supported_platforms(platform):
    r = run_claiming(platform, "playbooks/preflight.yml")
    assert r.returncode == 0, r.stdout
    assert f"{PLATFORMS[platform]['distribution']} {PLATFORMS[platform]['distribution_version']} is supported" in r.stdout
