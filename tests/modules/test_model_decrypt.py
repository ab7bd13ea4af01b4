"""model_decrypt as Ansible runs it (a subprocess fed ANSIBLE_MODULE_ARGS), on a tiny model packed
by the runtime's own code: verify only, decrypt, idempotence, check and diff mode, and each refusal
with the destination left as it was."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "library" / "model_decrypt.py"


BUILD = """
import json, sys
from inferd.store import crypto
from inferd.store.packed import pack
from inferd.testing import make_model
d = sys.argv[1]
make_model(d + "/plain", arch="llama")
master = crypto.new_master_key()
private, public = crypto.new_signing_key()
pack(d + "/plain", d + "/packed", master=master, signing_key=private, model_id="tiny-llama")
_, other = crypto.new_signing_key()
print(json.dumps({"key": master.hex(), "pub": public.decode(), "other_pub": other.decode()}))
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    # Built in a child process: torch and Ansible's module_utils do not share one interpreter well.
    d = tmp_path_factory.mktemp("model")
    env = {"PYTHONPATH": str(ROOT / "runtime"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", BUILD, str(d)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    keys = json.loads(r.stdout.strip().splitlines()[-1])
    return {"plain": d / "plain", "packed": d / "packed", **keys}


def run(args: dict, check: bool = False, diff: bool = False) -> dict:
    payload = {"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check, "_ansible_diff": diff}}
    r = subprocess.run([sys.executable, str(MODULE)], input=json.dumps(payload), capture_output=True, text=True)
    out = json.loads(r.stdout)
    out["_raw"] = r.stdout + r.stderr
    return out


def base(package, **kw) -> dict:
    return {"src": str(package["packed"]), "key": package["key"], "public_key": package["pub"], **kw}


def copy(package, tmp_path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(package["packed"], dst)
    return dst


def test_verify_only(package):
    out = run(base(package, deep=True))
    assert not out.get("failed"), out["msg"]
    assert out["changed"] is False and out["signed"] and out["encrypted"] and out["model_id"] == "tiny-llama"
    assert {f["name"] for f in out["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert package["key"] not in out["_raw"]


def test_decrypt_then_idempotent_then_check_mode(package, tmp_path):
    dest = tmp_path / "plain"
    out = run(base(package, dest=str(dest)), check=True, diff=True)
    assert out["changed"] and "model.safetensors" in out["changed_files"] and not dest.exists()
    assert "model.safetensors" in out["diff"]["after"]
    out = run(base(package, dest=str(dest)))
    assert out["changed"] and not out.get("failed"), out.get("msg")
    for f in package["plain"].iterdir():
        assert filecmp.cmp(f, dest / f.name, shallow=False), f.name
    assert oct((dest / "config.json").stat().st_mode & 0o777) == "0o640"
    assert run(base(package, dest=str(dest)))["changed"] is False
    assert run(base(package, dest=str(dest), checksum=True))["changed"] is False
    (dest / "config.json").write_text("{}")  # same stamp, different size: repaired
    assert run(base(package, dest=str(dest)), check=True)["changed_files"] == ["config.json"]
    assert run(base(package, dest=str(dest)))["changed"] is True
    assert filecmp.cmp(package["plain"] / "config.json", dest / "config.json", shallow=False)
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]  # no temporary directories left


@pytest.mark.parametrize(
    "case,expect",
    [
        ("wrong_key", "wrong key"),
        ("no_key", "this model is encrypted"),
        ("bad_key", "64 hex characters"),
        ("other_signer", "signature does not verify"),
        ("no_public_key", "a signature is required"),
        ("flipped_chunk_byte", "does not match the manifest"),
        ("edited_manifest", "signature does not verify"),
        ("missing_file", "missing"),
    ],
)
def test_refusals_leave_the_destination_alone(package, tmp_path, case, expect):
    dest = tmp_path / "dest"
    assert run(base(package, dest=str(dest)))["changed"]
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    src = copy(package, tmp_path)
    args = base(package, src=str(src), dest=str(dest), deep=True, checksum=True)
    if case == "wrong_key":
        args["key"] = "11" * 32
    elif case == "no_key":
        del args["key"]
    elif case == "bad_key":
        args["key"] = "not-a-key"
    elif case == "other_signer":
        args["public_key"] = package["other_pub"]
    elif case == "no_public_key":
        del args["public_key"]
    elif case == "flipped_chunk_byte":
        f = src / "data" / "model.safetensors.ipk"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    elif case == "edited_manifest":
        m = src / "manifest.json"
        m.write_text(m.read_text().replace("tiny-llama", "tiny-llamb"))
    elif case == "missing_file":
        (src / "data" / "tokenizer.json.ipk").unlink()
    out = run(args)
    assert out.get("failed") and expect in out["msg"], out["msg"]
    assert "Traceback" not in out["msg"] and package["key"] not in out["_raw"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "pkg"]
