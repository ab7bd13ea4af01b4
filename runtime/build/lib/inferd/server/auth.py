"""Who may call what. ROLE_TABLE is the one role table everything reads: a route with no entry is
refused (deny by default). API keys are stored only as sha256 digests and compared in constant
time; they are accepted only in the `Authorization: Bearer` header."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROLES = ("admin", "ops", "user")
KEY_PREFIX = "sk-inferd-"

# (method, route path) -> roles allowed. "anonymous" marks the only routes open without a key.
ANONYMOUS = "anonymous"
ROLE_TABLE: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/health"): frozenset({ANONYMOUS}),
    ("GET", "/ready"): frozenset({ANONYMOUS}),
    ("GET", "/v1/models"): frozenset({"user", "ops", "admin"}),
    ("POST", "/v1/chat/completions"): frozenset({"user"}),
    ("POST", "/v1/completions"): frozenset({"user"}),
    ("GET", "/v1/results/{result_id}"): frozenset({"user"}),
    ("GET", "/metrics"): frozenset({"ops", "admin"}),
    ("GET", "/admin/limits"): frozenset({"ops", "admin"}),
    ("PUT", "/admin/limits"): frozenset({"ops"}),
    ("GET", "/admin/logs"): frozenset({"ops"}),
    ("GET", "/admin/models"): frozenset({"admin"}),
    ("POST", "/admin/models/load"): frozenset({"admin"}),
    ("POST", "/admin/models/unload"): frozenset({"admin"}),
    ("GET", "/openapi.json"): frozenset({"user", "ops", "admin"}),
}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class ApiKey:
    key_id: str
    name: str
    role: str
    sha256: str
    created: float
    revoked: bool = False


class KeyStore:
    """A JSON file of key records (no secrets in it), rewritten atomically on change."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys: list[ApiKey] = []
        self.mtime = 0.0
        self.reload()

    def reload(self) -> None:
        if not self.path.exists():
            self.keys = []
            return
        mtime = self.path.stat().st_mtime
        if mtime == self.mtime:
            return
        self.keys = [ApiKey(**k) for k in json.loads(self.path.read_text())["keys"]]
        self.mtime = mtime

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys.")
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in self.keys]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, name: str, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if any(k.name == name and not k.revoked for k in self.keys):
            raise ValueError(f"a key named {name!r} exists: revoke it first or pick another name")
        key = KEY_PREFIX + secrets.token_hex(32)  # 256 random bits
        self.keys.append(ApiKey(key_id=secrets.token_hex(8), name=name, role=role, sha256=digest(key), created=time.time()))
        self._save()
        return key

    def revoke(self, name: str) -> None:
        hits = [k for k in self.keys if k.name == name and not k.revoked]
        if not hits:
            raise ValueError(f"no active key named {name!r}")
        for k in hits:
            k.revoked = True
        self._save()

    def lookup(self, presented: str) -> ApiKey | None:
        """The active key matching `presented`, comparing every stored digest in constant time."""
        d = digest(presented)
        found = None
        for k in self.keys:
            if hmac.compare_digest(k.sha256, d) and not k.revoked:
                found = k
        return found
