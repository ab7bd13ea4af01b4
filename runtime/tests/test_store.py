"""The packed-model format: round trips, refusals (each with a clear message and nothing under the
final name), bounded memory, and the engine loading a packed model directly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferd import LLM, SamplingParams

CHUNK_KIB = "64"


def inferd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert inferd("keygen", "--out", str(d)).returncode == 0
    other = tmp_path_factory.mktemp("other-keys")
    assert inferd("keygen", "--out", str(other)).returncode == 0
    assert (d / "model.key").stat().st_mode & 0o777 == 0o600
    return {
        "key": d / "model.key",
        "sign": d / "signing.pem",
        "pub": d / "signing.pub",
        "other_key": other / "model.key",
        "other_sign": other / "signing.pem",
        "other_pub": other / "signing.pub",
    }


@pytest.fixture(scope="module")
def model_with_big_file(llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    for f in llama_dir.iterdir():
        shutil.copy(f, d / f.name)
    (d / "big.bin").write_bytes(os.urandom(1 << 20) + bytes(1 << 20))  # 32 chunks: half noise, half zeros
    return d


def do_pack(src, out, keys, *extra, model_id=None):
    args = [
        "pack",
        str(src),
        str(out),
        "--encrypt",
        "--key-file",
        str(keys["key"]),
        "--sign-key",
        str(keys["sign"]),
        "--chunk-kib",
        CHUNK_KIB,
        *extra,
    ]
    if model_id:
        args += ["--model-id", model_id]
    r = inferd(*args)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def packed(model_with_big_file, keys, tmp_path_factory):
    return do_pack(model_with_big_file, tmp_path_factory.mktemp("p") / "packed", keys)


def fresh_copy(packed: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(packed, dst)
    return dst


def verify(path, keys, key="key", pub="pub"):
    args = ["verify", str(path)]
    if key:
        args += ["--key-file", str(keys[key])]
    if pub:
        args += ["--public-key", str(keys[pub])]
    return inferd(*args)


def test_round_trip_is_byte_identical(packed, model_with_big_file, keys, tmp_path):
    manifest = json.loads((packed / "manifest.json").read_text())
    big = next(f for f in manifest["files"] if f["name"] == "big.bin")
    assert len(big["chunks"]) == 32
    assert verify(packed, keys).returncode == 0
    out = tmp_path / "out"
    r = inferd("unpack", str(packed), str(out), "--key-file", str(keys["key"]), "--public-key", str(keys["pub"]))
    assert r.returncode == 0, r.stderr
    for f in model_with_big_file.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list(out.glob(".*partial*"))


def test_no_plaintext_in_the_packed_files(packed, model_with_big_file):
    secret = (model_with_big_file / "tokenizer.json").read_bytes()[:64]
    for f in (packed / "data").iterdir():
        assert secret not in f.read_bytes()


def test_engine_outputs_from_packed_equal_plain(packed, model_with_big_file, keys, monkeypatch):
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain = LLM(str(model_with_big_file)).generate(["The quick brown fox"], sp)[0]
    monkeypatch.setenv("INFERD_MODEL_KEY_FILE", str(keys["key"]))
    from_pack = LLM(str(packed)).generate(["The quick brown fox"], sp)[0]
    assert from_pack.token_ids == plain.token_ids and from_pack.text == plain.text


def test_key_from_a_systemd_credential(packed, keys, monkeypatch, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    shutil.copy(keys["key"], creds / "model-key")
    monkeypatch.delenv("INFERD_MODEL_KEY_FILE", raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert LLM(str(packed)).generate([[3, 4, 5]], SamplingParams(max_tokens=2))[0].token_ids


def test_wrong_key(packed, keys, tmp_path):
    r = verify(packed, keys, key="other_key")
    assert r.returncode != 0 and "wrong key" in r.stderr
    r = inferd("unpack", str(packed), str(tmp_path / "o"), "--key-file", str(keys["other_key"]))
    assert r.returncode != 0 and "wrong key" in r.stderr and not (tmp_path / "o" / "big.bin").exists()


def chunk_span(path: Path, name: str, index: int) -> tuple[int, int]:
    f = next(f for f in json.loads((path / "manifest.json").read_text())["files"] if f["name"] == name)
    start = sum(c["stored"] for c in f["chunks"][:index])
    return start, start + f["chunks"][index]["stored"]


def refused(path: Path, keys, tmp_path: Path, needle: str, **kw):
    r = verify(path, keys, **kw)
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    out = tmp_path / "unpacked"
    u = inferd(
        "unpack", str(path), str(out), "--key-file", str(keys["key"]), "--public-key", str(keys[kw.get("pub", "pub") or "pub"])
    )
    assert u.returncode != 0
    assert not (out / "big.bin").exists(), "a refused file reached its final name"
    return r.stderr


def test_one_flipped_byte(packed, keys, tmp_path):
    p = fresh_copy(packed, tmp_path)
    data = bytearray((p / "data/big.bin.ipk").read_bytes())
    a, _ = chunk_span(p, "big.bin", 5)
    data[a + 10] ^= 0x40
    (p / "data/big.bin.ipk").write_bytes(bytes(data))
    assert "big.bin: chunk 5" in refused(p, keys, tmp_path, "chunk 5")


def test_truncated_file(packed, keys, tmp_path):
    p = fresh_copy(packed, tmp_path)
    f = p / "data/big.bin.ipk"
    f.write_bytes(f.read_bytes()[:-1000])
    refused(p, keys, tmp_path, "truncated")


def test_two_chunks_swapped(packed, keys, tmp_path):
    p = fresh_copy(packed, tmp_path)
    f = p / "data/big.bin.ipk"
    data = f.read_bytes()
    a0, b0 = chunk_span(p, "big.bin", 20)
    a1, b1 = chunk_span(p, "big.bin", 21)
    assert b0 - a0 == b1 - a1  # two all-zero chunks: equal sizes, swappable in place
    f.write_bytes(data[:a0] + data[a1:b1] + data[a0:b0] + data[b1:])
    refused(p, keys, tmp_path, "chunk 20")


def test_chunk_from_another_file_or_model(packed, model_with_big_file, keys, tmp_path):
    other = do_pack(model_with_big_file, tmp_path / "other", keys, model_id="another-model")
    for donor, name in ((other, "big.bin"), (packed, "config.json")):
        p = fresh_copy(packed, tmp_path / donor.name / name)
        f = p / "data/big.bin.ipk"
        data = f.read_bytes()
        a, b = chunk_span(p, "big.bin", 0)
        da, db = chunk_span(donor, name, 0)
        piece = (donor / "data" / (name + ".ipk")).read_bytes()[da:db]
        f.write_bytes(data[:a] + piece + data[b:])
        refused(p, keys, tmp_path / donor.name / name, "")


def test_the_aead_alone_catches_a_moved_chunk(packed, keys):
    """Even with the manifest's chunk table forged to match, decryption refuses a moved chunk."""
    from inferd.store import crypto
    from inferd.store.packed import PackedModel

    pm = PackedModel(packed, master=crypto.read_master_key(str(keys["key"])))
    f = pm.files["big.bin"]
    fkey = crypto.derive_file_key(pm.master, bytes.fromhex(f["salt"]), pm.model_id, "big.bin")
    a, b = chunk_span(packed, "big.bin", 3)
    sealed = (packed / "data/big.bin.ipk").read_bytes()[a:b]
    crypto.open_sealed(fkey, pm.model_id, "big.bin", 3, False, sealed)
    for index, final, name, model in (
        (4, False, "big.bin", pm.model_id),
        (3, True, "big.bin", pm.model_id),
        (3, False, "config.json", pm.model_id),
        (3, False, "big.bin", "other"),
    ):
        with pytest.raises(crypto.DecryptError):
            crypto.open_sealed(fkey, model, name, index, final, sealed)


def test_missing_extra_and_renamed_files(packed, keys, tmp_path):
    p = fresh_copy(packed, tmp_path / "missing")
    (p / "data/config.json.ipk").unlink()
    refused(p, keys, tmp_path / "missing", "missing")
    p = fresh_copy(packed, tmp_path / "extra")
    (p / "data/evil.bin.ipk").write_bytes(b"x")
    refused(p, keys, tmp_path / "extra", "not in the manifest")
    p = fresh_copy(packed, tmp_path / "renamed")
    (p / "data/big.bin.ipk").rename(p / "data/big2.bin.ipk")
    refused(p, keys, tmp_path / "renamed", "missing")


def test_manifest_signed_by_another_key_or_unsigned(packed, keys, tmp_path):
    r = verify(packed, keys, pub="other_pub")
    assert r.returncode != 0 and "signature does not verify" in r.stderr
    p = fresh_copy(packed, tmp_path)
    (p / "manifest.sig").unlink()
    r = verify(p, keys)
    assert r.returncode != 0 and "not signed" in r.stderr
    p2 = fresh_copy(packed, tmp_path / "edited")
    m = json.loads((p2 / "manifest.json").read_text())
    m["model_version"] = "2"
    (p2 / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True))
    assert verify(p2, keys).returncode != 0


def test_disk_full_during_unpack(packed, keys, tiny_disk):
    r = inferd("unpack", str(packed), str(tiny_disk / "out"), "--key-file", str(keys["key"]))
    assert r.returncode != 0 and "disk full" in r.stderr, r.stderr
    assert not (tiny_disk / "out" / "big.bin").exists()
    assert not list(tiny_disk.glob(".*partial*")), "the partial directory was left behind"
    assert not list((tiny_disk / "out").glob(".*partial*")), "the partial file was left behind"


def test_kill_9_during_unpack_leaves_no_final_file(tmp_path, keys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with open(src / "huge.bin", "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    packed = do_pack(src, tmp_path / "packed", keys)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferd.cli", "unpack", str(packed), str(out), "--key-file", str(keys["key"])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The CLI stages the whole directory beside OUT (.out.partial-PID) and renames it at the end.
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/.huge.bin.partial*")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".out.partial-*/.huge.bin.partial*")), "the kill did not land during the write of huge.bin"
    assert not out.exists(), "a killed unpack left files under the final name"


def test_unpack_of_a_2_gib_file_keeps_memory_bounded(tmp_path, keys):
    """A 2 GiB file through unpack: peak RSS stays far below the file size."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with open(src / "weights.bin", "wb") as f:
        block = os.urandom(16 << 20)
        for _ in range(128):
            f.write(block)
    r = inferd("pack", str(src), str(tmp_path / "packed"), "--encrypt", "--key-file", str(keys["key"]))
    assert r.returncode == 0, r.stderr
    (src / "weights.bin").unlink()
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would count the forking pytest process.
    code = (
        "import re, sys; from inferd.cli import main; rc = main(sys.argv[1:]); "
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "unpack", str(tmp_path / "packed"), str(tmp_path / "out"), "--key-file", str(keys["key"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.strip().splitlines()[-1]) / 1024
    assert (tmp_path / "out" / "weights.bin").stat().st_size == 128 * (16 << 20)
    assert peak_mib < 600, f"unpacking a 2 GiB file peaked at {peak_mib:.0f} MiB"


def test_help_explains_the_commands():
    for cmd in ("pack", "verify", "unpack", "keygen"):
        r = inferd(cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def test_verify_without_a_public_key_fails_unless_unsigned_is_allowed(packed, keys):
    """Without the signer's key, an unsigned or re-signed package passes every other check: verify
    says no signature was checked and fails, unless told that is acceptable."""
    r = verify(packed, keys, pub=None)
    assert r.returncode == 3
    assert "NO signature checked" in r.stderr and "--public-key" in r.stderr and "--allow-unsigned" in r.stderr
    r = inferd("verify", str(packed), "--key-file", str(keys["key"]), "--allow-unsigned")
    assert r.returncode == 0, r.stderr
    assert "signature not checked (--allow-unsigned)" in r.stdout


def test_a_refused_unpack_leaves_no_plaintext(packed, keys, tmp_path):
    """A corrupt chunk in the last file (sorted) used to leave the files before it decrypted under
    OUT; now nothing is under OUT and the staging directory is gone."""
    p = fresh_copy(packed, tmp_path)
    last = sorted(f["name"] for f in json.loads((p / "manifest.json").read_text())["files"])[-1]
    data = bytearray((p / f"data/{last}.ipk").read_bytes())
    a, _ = chunk_span(p, last, 0)
    data[a + 10] ^= 0x40
    (p / f"data/{last}.ipk").write_bytes(bytes(data))
    out = tmp_path / "out"
    r = inferd("unpack", str(p), str(out), "--key-file", str(keys["key"]), "--public-key", str(keys["pub"]))
    assert r.returncode != 0 and last in r.stderr, r.stderr
    assert not out.exists(), sorted(x.name for x in out.iterdir())
    assert not list(tmp_path.glob(".out.partial*"))


def test_unpack_refuses_a_directory_that_is_not_empty(packed, keys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = inferd("unpack", str(packed), str(out), "--key-file", str(keys["key"]), "--public-key", str(keys["pub"]))
    assert r.returncode == 2 and "not an empty directory" in r.stderr
    assert sorted(x.name for x in out.iterdir()) == ["keep.txt"]
