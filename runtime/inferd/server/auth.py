"""Who may call what. ROLE_TABLE is the one role table everything reads: a route with no entry is
refused (deny by default). API keys are stored only as sha256 digests and compared in constant
time; they are accepted only in the `Authorization: Bearer` header.

A key's `key_id` owns its stored results and its rate limits, so it is unique per key and never
derived from the holder's name: a name handed to someone new must not hand over the old holder's
results (issue 24). Keys made by `inferd keys add` get a random id; the role's template derives
one from the key's digest (key_id_for), the same value on every run."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("inferd.auth")

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
    ("POST", "/admin/model/swap"): frozenset({"admin"}),
    ("GET", "/openapi.json"): frozenset({"user", "ops", "admin"}),
}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_for(sha256: str) -> str:
    """The id of the key with this digest; roles/inference_runtime/templates/keys.json.j2 computes
    the same: ('inferd-key-id:' ~ digest) | hash('sha256'), first 16 hex digits."""
    return hashlib.sha256(b"inferd-key-id:" + sha256.encode()).hexdigest()[:16]


def name_derived_id(name: str) -> str:
    """The id the role's template used to give a key: from its name (issue 24)."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file, the problem and the fix."""


# A key's priority class: under load the scheduler admits (and keeps from preemption) the higher
# class first, and shares places within a class by sequences held (engine/scheduler.py).
PRIORITIES = {"low": -1, "normal": 0, "high": 1}
# A key's tenant: keys of one tenant share prefix-cache entries and one fair share of the batch; a
# key without one is its own tenant. Names ops choose (a team, an application).
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_tenant(tenant: str) -> None:
    if tenant and not TENANT_NAME.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r} is not a tenant name: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


@dataclass
class ApiKey:
    key_id: str
    name: str
    role: str
    sha256: str
    created: float
    revoked: bool = False
    priority: str = "normal"
    tenant: str = ""  # "" = the key is its own tenant

    @property
    def cache_tenant(self) -> str:
        """Who shares this key's prefix cache and fair share: its tenant, else itself alone."""
        return f"tenant:{self.tenant}" if self.tenant else f"key:{self.key_id}"


class KeyStore:
    """A JSON file of key records (no secrets in it), rewritten atomically on change.

    A file that cannot be read as one (corrupt, hand-edited, two keys with one id) never becomes
    "no keys": `error` names the problem and the CLI refuses to write over it. The server goes on
    with the last keys it read from a good file (as nginx keeps its last good configuration when a
    reload fails), logs the error and raises the keys-file gauge for an alert: a half-written file
    must not lock every user out. A change the bad file meant to make, a revocation too, takes
    effect only once the file is fixed, which the next reload picks up without a restart. With no
    good file read since start-up, every lookup raises KeysFileError (503 naming it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys: list[ApiKey] = []
        self.mtime = 0.0
        self.error: str | None = None
        self.read_good = False  # keys came from a good file at least once
        self.reload()

    def reload(self) -> None:
        if not self.path.exists():
            self.keys, self.error, self.mtime = [], None, 0.0
            return
        mtime = self.path.stat().st_mtime
        if mtime == self.mtime:
            return
        self.mtime = mtime
        try:
            self.keys, self.error, self.read_good = parse_keys(self.path), None, True
        except KeysFileError as e:
            self.error = str(e)
            if not self.read_good:
                self.keys = []
            log.error("%s%s", e, "; serving with the last good keys until it is fixed" if self.read_good else "")

    def require_valid(self) -> None:
        if self.error is not None:
            raise KeysFileError(self.error)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys.")
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in self.keys]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, name: str, role: str, priority: str = "normal", tenant: str = "") -> str:
        self.require_valid()
        check_tenant(tenant)
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}: use one of {', '.join(PRIORITIES)}")
        if any(k.name == name and not k.revoked for k in self.keys):
            raise ValueError(f"a key named {name!r} exists: revoke it first or pick another name")
        key = KEY_PREFIX + secrets.token_hex(32)  # 256 random bits
        self.keys.append(
            ApiKey(
                key_id=secrets.token_hex(8),
                name=name,
                role=role,
                sha256=digest(key),
                created=time.time(),
                priority=priority,
                tenant=tenant,
            )
        )
        self._save()
        return key

    def revoke(self, name: str) -> None:
        self.require_valid()
        hits = [k for k in self.keys if k.name == name and not k.revoked]
        if not hits:
            raise ValueError(f"no active key named {name!r}")
        for k in hits:
            k.revoked = True
        self._save()

    def lookup(self, presented: str) -> ApiKey | None:
        """The active key matching `presented`, comparing every stored digest in constant time."""
        if not self.read_good:
            self.require_valid()
        d = digest(presented)
        found = None
        for k in self.keys:
            if hmac.compare_digest(k.sha256, d) and not k.revoked:
                found = k
        return found


_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_keys(path: Path) -> list[ApiKey]:
    """The file's keys, or KeysFileError naming what is wrong. Ids derived from names (the role's
    template before issue 24) are replaced by key_id_for(digest), as the template now writes them."""
    fix = f"restore {path} from a backup, or re-create it (re-run the role, or 'inferd keys add')"
    try:
        records = json.loads(path.read_text())["keys"]
        keys = [ApiKey(**r) for r in records]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KeysFileError(f"keys file {path} cannot be read ({type(e).__name__}: {e}): no key is accepted; {fix}") from None
    seen: dict[str, str] = {}
    migrated = 0
    for k in keys:
        fields = (k.key_id, k.name, k.sha256)
        if not all(isinstance(f, str) and f for f in fields) or k.role not in ROLES or not _HEX64.fullmatch(k.sha256):
            raise KeysFileError(f"keys file {path}: key {k.name!r} has a bad role, digest or id: no key is accepted; {fix}")
        if k.priority not in PRIORITIES:
            raise KeysFileError(
                f"keys file {path}: key {k.name!r} has priority {k.priority!r}, not one of {', '.join(PRIORITIES)}; {fix}"
            )
        try:
            check_tenant(k.tenant if isinstance(k.tenant, str) else "?")
        except ValueError as e:
            raise KeysFileError(f"keys file {path}: key {k.name!r}: {e}; {fix}") from None
        if k.key_id == name_derived_id(k.name):
            k.key_id, migrated = key_id_for(k.sha256), migrated + 1
        if k.key_id in seen:
            raise KeysFileError(
                f"keys file {path}: keys {seen[k.key_id]!r} and {k.name!r} share the id {k.key_id}, so they would share "
                f"results and limits: no key is accepted; give each key its own id ({fix})"
            )
        seen[k.key_id] = k.name
    if migrated:
        log.warning(
            "keys file %s: %d key ids were derived from names; each now has its own id, from its key "
            "(results stored under the old ids are no longer readable by anyone)",
            path,
            migrated,
        )
    return keys
