"""What a running server is built from: the runtime's version and the model's, reported by
`/health`, `/v1/models` and the `inferd_build_info` metric so that an upgrade (playbooks/upgrade.yml)
can check which release a port serves before the gateway sends it traffic."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from inferd import __version__
from inferd.store.packed import MANIFEST
from inferd.store.trust import PACKAGE_MANIFEST


def runtime_version() -> str:
    """The installed distribution's version (what the wheel was built as), else the source's."""
    try:
        return metadata.version("inferd")
    except metadata.PackageNotFoundError:
        return __version__


def model_version(path: str | Path, configured: str | None = None) -> str | None:
    """The model's version: `configured` where the deployment names it, else the sha256 of the
    package's manifest (the signed bytes, so equal digests mean the same package): the packed
    model's own, or the copy model_decrypt keeps beside a decrypted one; None for a plain model
    directory that never was a package."""
    if configured:
        return configured
    for name in (MANIFEST, PACKAGE_MANIFEST):
        try:
            return "sha256:" + hashlib.sha256((Path(path) / name).read_bytes()).hexdigest()
        except OSError:
            continue
    return None


def build_info(path: str | Path, configured_model_version: str | None = None) -> dict:
    return {"model_version": model_version(path, configured_model_version), "runtime_version": runtime_version()}
