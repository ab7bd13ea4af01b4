"""Refusals that happen on the controller, before any host is touched: a wrong vault password for
the bank inventory, and a model that gpu_assess says does not fit (the assess play run against
this machine, whose `nvidia-smi` answers with the XML recorded on the lent H200)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def run_assess(tmp_path, **extra) -> subprocess.CompletedProcess:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir(exist_ok=True)
    xml = ROOT / "tests/modules/fixtures/nvidia-smi-q-h200.xml"
    smi.write_text(f"#!/bin/sh\ncat {xml}\n")
    smi.chmod(0o755)
    args = [str(BIN / "ansible-playbook"), "-i", "inventory/device", "playbooks/assess.yml"]
    for k, v in extra.items():
        args += ["-e", f"{k}={v}"]
    env = dict(os.environ, PATH=f"{smi.parent}:{BIN}:/usr/bin:/bin")
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)


def test_assess_stops_the_play_when_the_model_does_not_fit(tmp_path):
    shape = dict(assess_params_billion=70.55, assess_kv_bytes_per_token=327680, assess_context_length=4096, assess_concurrency=1)
    r = run_assess(tmp_path, assess_dtype="bf16", **shape)
    assert r.returncode != 0
    assert "does NOT fit" in r.stdout and "Use quantization fp8" in r.stdout and "NVIDIA H200" in r.stdout
    r = run_assess(tmp_path, assess_dtype="int8", **shape)
    assert r.returncode == 0, r.stdout
    assert "fits; lowest-loss quantization that fits: int8" in r.stdout
