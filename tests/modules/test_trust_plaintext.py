"""model_decrypt's plaintext copy carries the package's signed manifest, so that the runtime checks
every file against it before serving the copy (issue 24: the runtime served any directory), and a
re-run stays unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_model_decrypt import ROOT, base, package, run  # noqa: F401 (a fixture)

CHECK = """
import sys
from inferd.store.trust import ModelTrustError, check_model
try:
    print(check_model(sys.argv[1], sys.argv[2], allow_unsigned=False).how)
except ModelTrustError as e:
    print("REFUSED", e)
"""


def runtime_check(model: Path, public_key: Path) -> str:
    env = {"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", CHECK, str(model), str(public_key)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_runtime_serves_a_decrypted_copy_only_as_signed(package, tmp_path):  # noqa: F811
    pub = tmp_path / "signing.pub"
    pub.write_text(package["pub"])
    dest = tmp_path / "plain"
    assert run(base(package, dest=str(dest)))["changed"]
    assert "signature and every file's sha256 verified" in runtime_check(dest, pub)
    assert run(base(package, dest=str(dest)))["changed"] is False  # the manifest copy is no stale file
    weights = next(dest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert "REFUSED" in runtime_check(dest, pub) and f"{weights.name} differs" in runtime_check(dest, pub)
    other = tmp_path / "other.pub"
    other.write_text(package["other_pub"])
    assert "does not verify" in runtime_check(dest, other)
