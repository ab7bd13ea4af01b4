"""Whether the server may load a model: the runtime's own check of who packed it (issue 24: the
server opened any directory, signed or not, whatever the deployment had verified).

The rule, applied at start-up and to every admin load:
- with the signer's public key configured, only a package whose manifest signature verifies with
  it is served; an unsigned package, or a plain directory, is refused whatever else is set;
- without one, nothing unsigned is served unless `model_allow_unsigned` says so explicitly;
- with a model (master) key configured, a model that is not encrypted is refused: it is a
  plaintext substitute for the package the key was meant for.

A plain directory that `model_decrypt` wrote from a signed package (the role's plaintext mode)
carries that package's manifest and signature (PACKAGE_MANIFEST, PACKAGE_SIGNATURE): it passes when the signature
verifies and every file's size and sha256 equal the signed manifest's, with no file more or less.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from inferd.store import crypto
from inferd.store.packed import MANIFEST, PackedModel, PackError, is_packed

# The manifest and signature of the package a plaintext copy was decrypted from, kept in it, and
# the stamp model_decrypt leaves there (library/model_decrypt.py writes all three).
PACKAGE_MANIFEST = ".inferd-package-manifest.json"
PACKAGE_SIGNATURE = ".inferd-package-manifest.sig"
UNPACKED_STAMP = ".inferd-unpacked.json"


class ModelTrustError(ValueError):
    """The model may not be served; the message names the model, the reason and the fix."""


@dataclass(frozen=True)
class Verdict:
    signed: bool  # a signature was checked and verified
    how: str  # one line for the log and the audit record


def master_key_configured(key_file: str | None) -> bool:
    """Whether a model key reaches this process (the same sources read_master_key reads)."""
    if key_file or os.environ.get(crypto.KEY_ENV):
        return True
    cred = os.environ.get("CREDENTIALS_DIRECTORY")
    return bool(cred) and (Path(cred) / crypto.CREDENTIAL_NAME).exists()


def read_public_key(path: str | None) -> bytes | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ModelTrustError(
            f"model_public_key_file {p} does not exist: deploy the signer's public key (signing.pub) there, or remove the setting"
        )
    return p.read_bytes()


def check_model(path: str | Path, public_key_file: str | None, allow_unsigned: bool, key_file: str | None = None) -> Verdict:
    """Raise ModelTrustError unless the model at `path` may be served under the rule above."""
    path = Path(path)
    public = read_public_key(public_key_file)
    if not path.is_dir():
        raise ModelTrustError(f"{path} is not a directory: give a model directory or a packed model")
    if is_packed(path):
        return _check_package(path, public, allow_unsigned, key_file)
    return _check_plain(path, public, allow_unsigned, key_file)


def _check_package(path: Path, public: bytes | None, allow_unsigned: bool, key_file: str | None) -> Verdict:
    manifest = json.loads((path / MANIFEST).read_bytes())
    if not manifest.get("encryption") and master_key_configured(key_file):
        raise ModelTrustError(
            f"{path} is not encrypted, but a model key is configured: refusing an unencrypted substitute "
            "(deliver the encrypted package, or remove the model key)"
        )
    if public is None:
        if not allow_unsigned:
            raise ModelTrustError(
                f"{path}: no model_public_key_file is configured, so its signature cannot be checked: set it to "
                "the signer's public key (signing.pub), or set model_allow_unsigned: true to serve unchecked models"
            )
        return Verdict(False, "package, signature not checked (model_allow_unsigned)")
    try:
        PackedModel(path, public_key=public).check_file_set()
    except PackError as e:
        raise ModelTrustError(f"refusing the model: {e}") from None
    return Verdict(True, "package, signature verified")


def _check_plain(path: Path, public: bytes | None, allow_unsigned: bool, key_file: str | None) -> Verdict:
    if master_key_configured(key_file):
        raise ModelTrustError(
            f"{path} is a plain (unencrypted) model directory, but a model key is configured: refusing an "
            "unencrypted substitute (deliver the encrypted package, or remove the model key)"
        )
    if (path / PACKAGE_SIGNATURE).exists() and public is not None:
        check_plain_against_package(path, public)
        return Verdict(True, "plain copy of a package, signature and every file's sha256 verified")
    if public is not None:
        raise ModelTrustError(
            f"{path} is a plain model directory with no signed manifest, and model_public_key_file is set: only a "
            "signed package (or model_decrypt's copy of one) is served"
        )
    if not allow_unsigned:
        raise ModelTrustError(
            f"{path} is a plain, unsigned model directory: serve a signed package with model_public_key_file set, "
            "or set model_allow_unsigned: true to serve unchecked models"
        )
    return Verdict(False, "plain directory, unsigned (model_allow_unsigned)")


def check_plain_against_package(path: Path, public: bytes) -> None:
    """The plain files are exactly those of the signed manifest kept beside them, byte for byte."""
    body = (path / PACKAGE_MANIFEST).read_bytes() if (path / PACKAGE_MANIFEST).exists() else b""
    if not crypto.verify_signature(public, body, (path / PACKAGE_SIGNATURE).read_bytes()):
        raise ModelTrustError(
            f"{path}: the signature in {PACKAGE_SIGNATURE} does not verify with model_public_key_file "
            "(another signer, or the manifest was changed)"
        )
    files = {f["name"]: f for f in json.loads(body)["files"]}
    kept = {PACKAGE_MANIFEST, PACKAGE_SIGNATURE, UNPACKED_STAMP}
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - kept
    extra, missing = sorted(on_disk - set(files)), sorted(set(files) - on_disk)
    if extra or missing:
        what = f"{extra[0]} is not in the signed manifest" if extra else f"{missing[0]} is missing"
        raise ModelTrustError(f"{path}: {what}: refusing the model")
    for name, f in sorted(files.items()):
        digest = hashlib.sha256()
        with open(path / name, "rb") as fh:
            while block := fh.read(8 << 20):
                digest.update(block)
        if digest.hexdigest() != f["sha256"]:
            raise ModelTrustError(f"{path}: {name} differs from the signed manifest (sha256): refusing the model")


def check_configured(cfg, path: str | Path) -> Verdict:
    """check_model with the server config's model_public_key_file, model_allow_unsigned, model_key_file."""
    return check_model(path, cfg.model_public_key_file, cfg.model_allow_unsigned, cfg.engine.model_key_file)
