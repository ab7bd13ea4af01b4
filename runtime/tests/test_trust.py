"""The runtime checks who packed a model before it loads it, at start-up and on admin loads
(issue 24: the server opened any directory, signed or not, and served a plaintext substitute
with a model key configured)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from inferd.store import crypto
from inferd.store.packed import MANIFEST, SIGNATURE, PackedModel, pack
from inferd.store.trust import PACKAGE_MANIFEST, PACKAGE_SIGNATURE, ModelTrustError, check_model


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("signer")
    private, public = crypto.new_signing_key()
    other_private, other_public = crypto.new_signing_key()
    (d / "signing.pub").write_bytes(public)
    (d / "other.pub").write_bytes(other_public)
    crypto.write_secret(d / "model.key", crypto.new_master_key().hex().encode())
    return {"private": private, "public": d / "signing.pub", "other": d / "other.pub", "other_private": other_private,
            "key": d / "model.key"}  # fmt: skip


@pytest.fixture
def plain(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "weights.bin").write_bytes(b"w" * 5000)
    return d


def packed(src: Path, out: Path, signing_key: bytes | None, master: bytes | None = None) -> Path:
    pack(src, out, signing_key=signing_key, master=master, chunk_size=1024)
    return out


def plain_copy(package: Path, out: Path) -> Path:
    """What the role's plaintext mode leaves: the files, and the package's signed manifest."""
    PackedModel(package).unpack(out)
    shutil.copy(package / MANIFEST, out / PACKAGE_MANIFEST)
    shutil.copy(package / SIGNATURE, out / PACKAGE_SIGNATURE)
    return out


@pytest.fixture(autouse=True)
def no_model_key(monkeypatch):
    monkeypatch.delenv(crypto.KEY_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_signed_package_with_the_signers_key_is_served(plain, signer, tmp_path):
    pkg = packed(plain, tmp_path / "pkg", signer["private"])
    assert check_model(pkg, str(signer["public"]), allow_unsigned=False).signed


@pytest.mark.parametrize("allow_unsigned", [False, True])
def test_with_a_public_key_nothing_unsigned_is_served(plain, signer, tmp_path, allow_unsigned):
    unsigned = packed(plain, tmp_path / "unsigned", None)
    other = packed(plain, tmp_path / "other", signer["other_private"])
    for model, needle in ((unsigned, "not signed"), (other, "does not verify"), (plain, "plain model directory")):
        with pytest.raises(ModelTrustError, match=needle):
            check_model(model, str(signer["public"]), allow_unsigned=allow_unsigned)


def test_without_a_public_key_unsigned_needs_the_explicit_switch(plain, signer, tmp_path):
    pkg = packed(plain, tmp_path / "pkg", signer["private"])
    for model in (plain, pkg):
        with pytest.raises(ModelTrustError, match="model_allow_unsigned"):
            check_model(model, None, allow_unsigned=False)
        assert not check_model(model, None, allow_unsigned=True).signed


def test_a_plaintext_substitute_is_refused_when_a_model_key_is_configured(plain, signer, tmp_path, monkeypatch):
    signed_unencrypted = packed(plain, tmp_path / "pkg", signer["private"])
    monkeypatch.setenv(crypto.KEY_ENV, str(signer["key"]))
    for model in (plain, signed_unencrypted):
        with pytest.raises(ModelTrustError, match="unencrypted substitute"):
            check_model(model, str(signer["public"]), allow_unsigned=True)
    encrypted = packed(plain, tmp_path / "enc", signer["private"], crypto.read_master_key(str(signer["key"])))
    assert check_model(encrypted, str(signer["public"]), allow_unsigned=False).signed


def test_a_plain_copy_of_a_signed_package_is_checked_file_by_file(plain, signer, tmp_path):
    copy = plain_copy(packed(plain, tmp_path / "pkg", signer["private"]), tmp_path / "copy")
    assert check_model(copy, str(signer["public"]), allow_unsigned=False).signed
    with pytest.raises(ModelTrustError, match="does not verify"):
        check_model(copy, str(signer["other"]), allow_unsigned=True)
    (copy / "weights.bin").write_bytes(b"W" + b"w" * 4999)
    with pytest.raises(ModelTrustError, match="weights.bin differs"):
        check_model(copy, str(signer["public"]), allow_unsigned=False)
    (copy / "weights.bin").write_bytes(b"w" * 5000)
    (copy / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ModelTrustError, match="extra.safetensors is not in the signed manifest"):
        check_model(copy, str(signer["public"]), allow_unsigned=False)


def test_a_missing_public_key_file_is_named(plain, tmp_path):
    with pytest.raises(ModelTrustError, match="model_public_key_file .*nope.pub does not exist"):
        check_model(plain, str(tmp_path / "nope.pub"), allow_unsigned=True)


# ---- the server: start-up and admin loads ------------------------------------------------------
def test_the_server_refuses_an_unsigned_model_at_start_up(llama_dir, signer, tmp_path):
    from inferd.server.app import ServerState
    from inferd.server.config import ServerConfig

    fatal = []
    cfg = ServerConfig(model=str(llama_dir), data_dir=str(tmp_path), model_public_key_file=str(signer["public"]))
    state = ServerState(cfg, on_fatal=fatal.append)
    state.load_model(at_start=True)
    assert not state.ready and state.engine is None
    assert len(fatal) == 1 and "plain model directory" in fatal[0]
    state.close()
    fatal.clear()
    state = ServerState(ServerConfig(model=str(llama_dir), data_dir=str(tmp_path / "2")), on_fatal=fatal.append)
    state.load_model(at_start=True)  # no key, no switch: unsigned is refused by default
    assert len(fatal) == 1 and "model_allow_unsigned" in fatal[0]
    state.close()


def test_admin_loads_are_checked_too(llama_dir, signer, tmp_path):
    from fastapi.testclient import TestClient

    from inferd.server.app import create_app
    from inferd.server.audit import read_records
    from inferd.server.auth import KeyStore
    from inferd.server.config import ServerConfig

    pkg = packed(llama_dir, tmp_path / "signed", signer["private"])
    unsigned = packed(llama_dir, tmp_path / "unsigned", None)
    cfg = ServerConfig(model=str(pkg), data_dir=str(tmp_path / "data"), model_public_key_file=str(signer["public"]))
    admin = KeyStore(cfg.keys_path).add("adam", "admin")
    headers = {"Authorization": f"Bearer {admin}"}
    with TestClient(create_app(cfg, load_model=False)) as client:
        for model in (llama_dir, unsigned):
            r = client.post("/admin/models/load", json={"model": str(model)}, headers=headers)
            assert r.status_code == 400, r.text
            assert "signed" in r.json()["error"]["message"] and r.json()["error"]["param"] == "model"
        r = client.post("/admin/models/load", json={"model": str(pkg), "served_model_name": "tiny"}, headers=headers)
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = client.get("/admin/models", headers=headers).json()
            if state["ready"] or state["load_error"]:
                break
            time.sleep(0.2)
        assert state["ready"] and state["model"] == "tiny", state
    records = read_records(cfg.audit_path)
    assert sum(1 for r in records if r.get("route") == "/admin/models/load" and r.get("status") == 400) == 2
