"""The keys file: ids unique per key, legacy name-derived ids migrated, and a corrupt file
reported and refused, never read as "no keys" (issue 24)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from inferd.server.auth import KeysFileError, KeyStore, digest, key_id_for


def inferd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", *args], capture_output=True, text=True, timeout=120)


def legacy_file(path, keys: dict[str, str]) -> None:
    """A keys file as the role wrote it before issue 24: key_id = sha256(name)[:16]."""
    records = [
        {
            "key_id": hashlib.sha256(name.encode()).hexdigest()[:16],
            "name": name,
            "role": "user",
            "sha256": digest(key),
            "created": 0,
            "revoked": False,
        }  # fmt: skip
        for name, key in keys.items()
    ]
    path.write_text(json.dumps({"keys": records}))


def test_keys_made_by_the_cli_have_their_own_ids(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    first = store.add("alice", "user")
    store.revoke("alice")
    second = store.add("alice", "user")
    assert store.lookup(first) is None and store.lookup(second) is not None
    assert len({k.key_id for k in store.keys}) == 2


def test_name_derived_ids_are_replaced_by_ids_from_the_key(tmp_path):
    path = tmp_path / "keys.json"
    legacy_file(path, {"alice": "sk-" + "a" * 40})
    store = KeyStore(path)
    key = store.lookup("sk-" + "a" * 40)
    assert key.key_id == key_id_for(digest("sk-" + "a" * 40))
    assert key.key_id != hashlib.sha256(b"alice").hexdigest()[:16]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "cannot be read"),
        ('{"keys": [{"key_id": "x"}]}', "cannot be read"),
        ('{"nokeys": []}', "cannot be read"),
        ('{"keys": [{"key_id": "a", "name": "n", "role": "root", "sha256": "00", "created": 0}]}', "bad role"),
    ],
)
def test_a_corrupt_keys_file_is_named_and_accepts_no_key(tmp_path, content, needle):
    path = tmp_path / "keys.json"
    path.write_text(content)
    store = KeyStore(path)
    assert needle in store.error and str(path) in store.error
    with pytest.raises(KeysFileError, match="no key is accepted"):
        store.lookup("sk-anything")


def test_two_keys_with_one_id_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    store.add("alice", "user")
    store.add("bob", "user")
    doc = json.loads(path.read_text())
    doc["keys"][1]["key_id"] = doc["keys"][0]["key_id"]
    path.write_text(json.dumps(doc))
    with pytest.raises(KeysFileError, match="share the id"):
        KeyStore(path).lookup("sk-x")


def test_the_cli_never_writes_over_a_corrupt_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{corrupt")
    r = inferd("keys", "add", "--keys-file", str(path), "--name", "alice", "--role", "user")
    assert r.returncode == 2 and str(path) in r.stderr and "restore" in r.stderr, r.stderr
    assert path.read_text() == "{corrupt"
    r = inferd("keys", "list", "--keys-file", str(path))
    assert r.returncode == 2 and "cannot be read" in r.stderr


def test_the_server_answers_503_naming_the_file_and_recovers_when_it_is_fixed(tmp_path):
    from fastapi.testclient import TestClient

    from inferd.server.app import create_app
    from inferd.server.config import ServerConfig

    cfg = ServerConfig(model="unused", data_dir=str(tmp_path), model_allow_unsigned=True)
    key = KeyStore(cfg.keys_path).add("olivia", "ops")
    good = cfg.keys_path.read_text()
    cfg.keys_path.write_text(good[: len(good) // 2])  # a torn write
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(cfg, load_model=False)) as client:
        assert client.get("/health").status_code == 200  # the service is up
        r = client.get("/admin/limits", headers=headers)
        assert r.status_code == 503 and r.json()["error"]["code"] == "keys_file_invalid"
        assert str(cfg.keys_path) in r.json()["error"]["message"]
        cfg.keys_path.write_text(good)
        import os

        os.utime(cfg.keys_path, (1, 1))  # a new mtime, whatever the clock's resolution
        assert client.get("/admin/limits", headers=headers).status_code == 200
