"""API keys have one source of truth each: the inventory (vault) for the keys it lists, the host for
keys added there with `inferd keys add`. The runtime role's key tasks, run twice against a data
directory on this machine with the runtime's own KeyStore acting as the CLI in between: the key
added on the host survives the next run, a key revoked on the host stays revoked, a key dropped
from the vault is gone, and a key added to the vault appears."""

from __future__ import annotations

import getpass
import grp
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "runtime"))
from inferd.server.auth import KeyStore  # noqa: E402

PLAY = """
- name: Write the API keys as the runtime role does
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Write the keys
      ansible.builtin.include_role:
        name: inference_runtime
        tasks_from: keys
"""

ALICE = {"name": "alice", "role": "user", "key": "sk-inferd-alice-" + "a" * 48}
OPS = {"name": "ops", "role": "ops", "key": "sk-inferd-ops-" + "b" * 50}
NEW = {"name": "new-app", "role": "user", "key": "sk-inferd-new-" + "c" * 50}


def deploy(tmp_path: Path, keys: list[dict]) -> subprocess.CompletedProcess:
    (tmp_path / "play.yml").write_text(PLAY)
    settings = {
        "inference_runtime_data_dir": str(tmp_path / "data"),
        "inference_runtime_user": getpass.getuser(),
        "inference_runtime_api_keys": keys,
    }
    (tmp_path / "data").mkdir(exist_ok=True)
    cmd = [str(BIN / "ansible-playbook"), str(tmp_path / "play.yml"), "-e", json.dumps(settings)]
    env = dict(os.environ)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for k in keys:
        assert k["key"] not in r.stdout
    return r


def test_keys_added_or_revoked_on_the_host_survive_the_next_run(tmp_path):
    if grp.getgrgid(os.getgid()).gr_name != getpass.getuser():
        # The role gives the file to the service user's group of the same name.
        import pytest

        pytest.skip("this user has no group of its own name")
    deploy(tmp_path, [ALICE, OPS])
    store = KeyStore(tmp_path / "data" / "keys.json")
    assert store.lookup(ALICE["key"]).name == "alice"
    # On the host: a key for a batch job, and alice's key revoked (it leaked).
    bot_key = store.add("batch-bot", "user")
    store.revoke("alice")

    # The next run, with a key added to the vault and ops dropped from it.
    r = deploy(tmp_path, [ALICE, NEW])
    assert bot_key not in r.stdout
    store = KeyStore(tmp_path / "data" / "keys.json")
    assert store.lookup(bot_key).name == "batch-bot"
    assert store.lookup(ALICE["key"]) is None
    assert [k.revoked for k in store.keys if k.name == "alice"] == [True]
    assert store.lookup(NEW["key"]).name == "new-app"
    assert store.lookup(OPS["key"]) is None and not [k for k in store.keys if k.name == "ops"]

    # Nothing changed on the host: the run after changes nothing either.
    r = deploy(tmp_path, [ALICE, NEW])
    assert "changed=0" in r.stdout.split("PLAY RECAP")[1]
