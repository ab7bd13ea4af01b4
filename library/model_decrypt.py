#!/usr/bin/python
# Copyright: inferd contributors. Apache-2.0.
"""model_decrypt: verify a packed inferd model and, when asked, decrypt it to a directory."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_decrypt
short_description: Verify a packed (compressed, encrypted, signed) inferd model and optionally decrypt it
description:
  - Checks a model package made by C(inferd pack) before anything else uses it, through the
    runtime's own store code (one implementation of the format), namely the manifest's Ed25519
    signature against I(public_key), the set of files, every stored chunk's digest, and that
    I(key) is the key the model was packed with (by its key id, without decrypting).
  - With I(deep=true), also decrypts and decompresses every chunk in memory and checks every
    file's plaintext SHA-256, writing nothing.
  - With I(dest), writes the plaintext model there (for an encrypted disk that is to hold it in
    the clear). Streaming and constant-memory. The files go into a temporary directory next to
    I(dest), each checked against the manifest's digest, and the directory is renamed into place
    only after the last one; an interrupted or failed run leaves I(dest) as it was.
  - Idempotent. I(dest) carries a stamp of the manifest it was made from; when the stamp matches
    and every file has its size, nothing changes (I(checksum=true) re-hashes every file instead).
  - Runs with the runtime's interpreter, which has the C(inferd) package
    (C(ansible_python_interpreter=/opt/inferd/venv/bin/python)); fails with that advice otherwise.
  - Supports check mode (reports what would change) and diff mode (the list of files before and after).
version_added: "0.1.0"
author: inferd contributors
options:
  src:
    description: The packed model directory on the host (holds C(manifest.json), C(manifest.sig), C(data/)).
    type: path
    required: true
  dest:
    description:
      - Directory to write the plaintext model to. Omit to verify only (the model is then
        served encrypted and decrypted in memory by the runtime).
    type: path
  key:
    description:
      - The model's 256-bit master key, hex (64 characters), from the vault. Required when the
        package is encrypted. Never logged.
    type: str
  public_key:
    description:
      - The signer's Ed25519 public key, PEM text. When given, an unsigned manifest or one signed
        by another key is refused.
    type: str
  require_signature:
    description: Refuse the package unless I(public_key) is given and the signature verifies.
    type: bool
    default: true
  deep:
    description: Also decrypt and check every file's plaintext digest (reads the whole model).
    type: bool
    default: false
  checksum:
    description: With I(dest), compare the existing files by SHA-256 instead of by the stamp and sizes.
    type: bool
    default: false
  owner:
    description: Owner of the files written under I(dest).
    type: str
  group:
    description: Group of the files written under I(dest).
    type: str
  mode:
    description: Mode of the files under I(dest); directories get the matching execute bits.
    type: str
    default: "0640"
notes:
  - Needs the C(inferd) package in the interpreter that runs the module (the runtime's virtualenv).
  - The package format is described in C(runtime/README.md) and implemented in
    C(runtime/inferd/store/packed.py).
"""

EXAMPLES = r"""
- name: Verify the delivered package against the signer's key (served encrypted)
  model_decrypt:
    src: /var/lib/inferd/models/incoming/deepseek-r1-8b
    key: "{{ vault_inferd_model_key }}"
    public_key: "{{ lookup('ansible.builtin.file', 'files/model-signing.pub') }}"
  vars:
    ansible_python_interpreter: /opt/inferd/venv/bin/python
  no_log: true

- name: Decrypt onto the encrypted model disk
  model_decrypt:
    src: /var/lib/inferd/models/incoming/deepseek-r1-8b
    dest: /var/lib/inferd/models/deepseek-r1-8b-plain
    key: "{{ vault_inferd_model_key }}"
    public_key: "{{ lookup('ansible.builtin.file', 'files/model-signing.pub') }}"
    owner: root
    group: inferd
    mode: "0640"
  vars:
    ansible_python_interpreter: /opt/inferd/venv/bin/python
"""

RETURN = r"""
model_id:
  description: The model id recorded in the manifest.
  returned: always
  type: str
  sample: deepseek-r1-distill-llama-8b
manifest_sha256:
  description: SHA-256 of the manifest, which names this exact package.
  returned: always
  type: str
signed:
  description: Whether the manifest's signature was checked and holds.
  returned: always
  type: bool
encrypted:
  description: Whether the package is encrypted.
  returned: always
  type: bool
files:
  description: Every file in the package with its plaintext size.
  returned: always
  type: list
  elements: dict
  sample: [{name: config.json, size: 642}]
changed_files:
  description: Files under I(dest) that were (or in check mode would be) written.
  returned: when dest is given
  type: list
  elements: str
dest:
  description: The plaintext directory.
  returned: when dest is given
  type: str
"""

import grp
import hashlib
import json
import os
import pwd
import shutil
import traceback
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

STAMP = ".inferd-unpacked.json"
# The package's signed manifest, kept beside the plaintext so that the runtime can check every file
# against it before serving (inferd.store.trust; issue 24).
KEPT = {"manifest.json": ".inferd-package-manifest.json", "manifest.sig": ".inferd-package-manifest.sig"}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stale_files(dest: Path, files: dict, manifest_sha: str, checksum: bool) -> list[str]:
    """Files under dest that do not match the manifest (all of them when the stamp differs)."""
    if not dest.is_dir():
        return sorted(files)
    try:
        stamp = json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    if not checksum and stamp.get("manifest_sha256") != manifest_sha:
        return sorted(files)
    stale = []
    for name, f in sorted(files.items()):
        p = dest / name
        if not p.is_file() or p.stat().st_size != f["size"] or (checksum and _sha256(p) != f["sha256"]):
            stale.append(name)
    extra = sorted(
        str(p.relative_to(dest))
        for p in dest.rglob("*")
        if p.is_file() and str(p.relative_to(dest)) not in {STAMP, *KEPT.values(), *files}
    )
    return stale + extra


def _apply_ownership(root: Path, owner, group, mode: int) -> None:
    uid = pwd.getpwnam(owner).pw_uid if owner else -1
    gid = grp.getgrnam(group).gr_gid if group else -1
    dir_mode = mode | ((mode & 0o444) >> 2)  # r -> x on directories
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chown(dirpath, uid, gid)
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chown(p, uid, gid)
            os.chmod(p, mode)


def run(module: AnsibleModule) -> dict:
    try:
        from inferd.store.packed import PackedModel, PackError
    except ImportError:
        module.fail_json(
            msg="the inferd package is not importable by this interpreter: run the task with the runtime's "
            "interpreter, e.g. vars: ansible_python_interpreter: /opt/inferd/venv/bin/python"
        )
    p = module.params
    src = Path(p["src"])
    master = None
    if p["key"]:
        try:
            master = bytes.fromhex(p["key"].strip())
        except ValueError:
            master = b""
        if len(master) != 32:
            module.fail_json(msg="key must be the model's 256-bit master key as 64 hex characters (inferd keygen makes one)")
    public = p["public_key"].encode() if p["public_key"] else None
    if p["require_signature"] and public is None:
        module.fail_json(
            msg="a signature is required: set public_key to the signer's Ed25519 public key (PEM), or require_signature: false"
        )
    try:
        pm = PackedModel(src, master=master, public_key=public, require_signature=p["require_signature"])
        if pm.manifest.get("encryption") and master is None:
            raise PackError(f"{src}: this model is encrypted: pass key (the model's master key from the vault)")
        pm.verify(deep=p["deep"])
    except PackError as e:
        module.fail_json(msg=f"model package refused: {e}", src=str(src))
    except Exception as e:  # a malformed key or manifest: name it, no traceback
        module.fail_json(msg=f"model package refused: {type(e).__name__}: {e}", src=str(src))

    manifest_sha = hashlib.sha256(pm.manifest_bytes).hexdigest()
    result = {
        "changed": False,
        "model_id": pm.model_id,
        "manifest_sha256": manifest_sha,
        "signed": pm.signed,
        "encrypted": bool(pm.manifest.get("encryption")),
        "files": [{"name": n, "size": f["size"]} for n, f in sorted(pm.files.items())],
    }
    if not p["dest"]:
        return result

    dest = Path(p["dest"])
    stale = _stale_files(dest, pm.files, manifest_sha, p["checksum"])
    if pm.signed and not (dest / KEPT["manifest.sig"]).is_file():
        stale = sorted(pm.files)  # a copy from before the runtime checked one: give it the manifest
    result.update(dest=str(dest), changed_files=stale, changed=bool(stale))
    if module._diff and stale:
        before = sorted(str(x.relative_to(dest)) for x in dest.rglob("*") if x.is_file()) if dest.is_dir() else []
        result["diff"] = {"before": "\n".join(before) + "\n", "after": "\n".join(sorted(pm.files)) + "\n"}
    if not stale or module.check_mode:
        return result

    mode = int(p["mode"], 8)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.unpack(tmp)
        (tmp / STAMP).write_text(json.dumps({"model_id": pm.model_id, "manifest_sha256": manifest_sha}))
        for name, kept in KEPT.items() if pm.signed else ():
            shutil.copy(src / name, tmp / kept)
        _apply_ownership(tmp, p["owner"], p["group"], mode)
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
    except PackError as e:
        module.fail_json(msg=f"decryption stopped, {dest} left as it was: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            dest=dict(type="path"),
            key=dict(type="str", no_log=True),
            public_key=dict(type="str"),
            require_signature=dict(type="bool", default=True),
            deep=dict(type="bool", default=False),
            checksum=dict(type="bool", default=False),
            owner=dict(type="str"),
            group=dict(type="str"),
            mode=dict(type="str", default="0640"),
        ),
        supports_check_mode=True,
    )
    try:
        module.exit_json(**run(module))
    except Exception as e:
        module.fail_json(msg=f"model_decrypt failed: {type(e).__name__}: {e}", exception=traceback.format_exc())


if __name__ == "__main__":
    main()
