"""Shared by the tests that run playbooks on this machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
H200_XML = ROOT / "tests/modules/fixtures/nvidia-smi-q-h200.xml"


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    """An environment whose `nvidia-smi` answers as the lent H200 did (`-q -x`: the recorded XML),
    reporting the given compute capability to `--query-gpu=pci.bus_id,compute_cap`."""

    def make(compute_capability: str = "9.0") -> dict:
        smi = tmp_path / "fake-bin" / "nvidia-smi"
        smi.parent.mkdir(exist_ok=True)
        smi.write_text(
            "#!/bin/sh\n"
            'case "$1" in\n'
            f'  --query-gpu=*) echo "00000000:00:06.0, {compute_capability}" ;;\n'
            f"  *) cat {H200_XML} ;;\n"
            "esac\n"
        )
        smi.chmod(0o755)
        return dict(os.environ, PATH=f"{smi.parent}:{BIN}:/usr/bin:/bin")

    return make
