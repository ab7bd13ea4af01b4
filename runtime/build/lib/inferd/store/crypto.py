"""Keys, the per-chunk AEAD and manifest signatures.

Each file gets its own AES-256-GCM key, derived with HKDF-SHA256 from the master key, a random
per-file salt, the model id and the file name. A chunk's nonce is its index plus a final-chunk
flag, and its associated data binds model id, file name, index and the flag: a chunk cannot be
moved to another position, file or model, and a file cannot be cut short, without decryption
failing.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
KEY_ENV = "INFERD_MODEL_KEY_FILE"
CREDENTIAL_NAME = "model-key"


class KeyError_(ValueError):
    pass


class DecryptError(ValueError):
    pass


def derive_file_key(master: bytes, salt: bytes, model_id: str, name: str) -> bytes:
    info = b"inferd-pack/1 file key\0" + model_id.encode() + b"\0" + name.encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(master)


def _nonce(index: int, final: bool) -> bytes:
    return struct.pack(">QB3x", index, 1 if final else 0)


def _aad(model_id: str, name: str, index: int, final: bool) -> bytes:
    return b"\0".join([b"inferd-pack/1", model_id.encode(), name.encode(), str(index).encode(), b"F" if final else b"-"])


def seal(key: bytes, model_id: str, name: str, index: int, final: bool, data: bytes) -> bytes:
    return AESGCM(key).encrypt(_nonce(index, final), data, _aad(model_id, name, index, final))


def open_sealed(key: bytes, model_id: str, name: str, index: int, final: bool, data: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(_nonce(index, final), data, _aad(model_id, name, index, final))
    except InvalidTag:
        raise DecryptError(
            f"{name}: chunk {index} failed authentication: wrong key, or the chunk was changed, moved, "
            "swapped or taken from another file or model"
        ) from None


def new_master_key() -> bytes:
    return os.urandom(KEY_BYTES)


def write_secret(path: Path, data: bytes) -> None:
    """Create a file readable by its owner only, never replacing an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_master_key(key_file: str | None = None) -> bytes:
    """The master key from, in order: the given file, the file named by $INFERD_MODEL_KEY_FILE,
    or the systemd credential `model-key` ($CREDENTIALS_DIRECTORY). Never from an argument value."""
    path = key_file or os.environ.get(KEY_ENV)
    if not path and os.environ.get("CREDENTIALS_DIRECTORY"):
        cred = Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if cred.exists():
            path = str(cred)
    if not path:
        raise KeyError_(f"no model key: pass --key-file, set {KEY_ENV}, or provide the systemd credential '{CREDENTIAL_NAME}'")
    p = Path(path)
    if not p.exists():
        raise KeyError_(f"key file {p} does not exist")
    raw = p.read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode()) if len(raw) == 2 * KEY_BYTES else raw
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) != KEY_BYTES:
        raise KeyError_(f"key file {p} does not hold a 256-bit key (make one with 'inferd keygen')")
    return key


def new_signing_key() -> tuple[bytes, bytes]:
    sk = Ed25519PrivateKey.generate()
    private = sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = sk.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def sign(private_pem: bytes, data: bytes) -> bytes:
    sk = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(sk, Ed25519PrivateKey):
        raise KeyError_("the signing key is not an Ed25519 private key (make one with 'inferd keygen')")
    return sk.sign(data)


def verify_signature(public_pem: bytes, data: bytes, signature: bytes) -> bool:
    pk = serialization.load_pem_public_key(public_pem)
    if not isinstance(pk, Ed25519PublicKey):
        raise KeyError_("the public key is not an Ed25519 key")
    try:
        pk.verify(signature, data)
        return True
    except InvalidSignature:
        return False
