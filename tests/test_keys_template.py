"""The role's keys file gives every key an id of its own, never one derived from the holder's name
(issue 24: a name handed to someone new handed over the old holder's results and limits), and it
is the id the runtime computes from the key's digest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
from inferd.server.auth import KeyStore, digest, key_id_for  # noqa: E402

ANSIBLE = Path(sys.executable).parent / "ansible"


def render_keys(tmp_path: Path, keys: list[dict]) -> Path:
    dest = tmp_path / "keys.json"
    extra = json.dumps({"inference_runtime_api_keys": keys})
    args = [str(ANSIBLE), "localhost", "-c", "local", "-m", "ansible.builtin.template"]
    args += ["-a", f"src={ROOT}/roles/inference_runtime/templates/keys.json.j2 dest={dest}", "-e", extra]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


def test_a_reused_name_gets_a_new_id_and_the_runtime_agrees(tmp_path):
    old_key, new_key = "sk-" + "a" * 40, "sk-" + "b" * 40
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = KeyStore(render_keys(tmp_path / "old", [{"name": "alice", "role": "user", "key": old_key}]))
    new = KeyStore(render_keys(tmp_path / "new", [{"name": "alice", "role": "user", "key": new_key}]))
    assert old.error is None and new.error is None
    assert old.lookup(old_key).key_id != new.lookup(new_key).key_id
    assert new.lookup(new_key).key_id == key_id_for(digest(new_key))


def test_two_keys_never_share_an_id(tmp_path):
    keys = [{"name": f"k{i}", "role": "user", "key": f"sk-{i:040d}"} for i in range(5)]
    store = KeyStore(render_keys(tmp_path, keys))
    assert store.error is None and len({k.key_id for k in store.keys}) == 5
