#!/usr/bin/env python3
"""Active readiness checks for the gateway's pool of runtime hosts (roles/gateway, gateway_pool_hosts).

Open-source nginx only marks a server failed after real requests fail on it (max_fails); this probes
every backend's GET /ready, rewrites the upstream file with a failing backend marked `down`, and
reloads nginx gracefully (streams in flight finish on the old workers) only when the set changed.
A backend that answers /ready again is put back the same way.

Which ports of a host take traffic: every port of `ports`, weight 100, unless WEIGHTS_DIR/NAME.json
({"PORT": weight}, written by roles/release while it switches colours, its weights summing to 100
per host) names them; a port of weight 0 there takes no new requests (it is draining, or stopped).

Usage: inferd-gateway-pool.py CONFIG [--once | --interval SECONDS]
  --once prints a JSON line {"changed": bool, "backends": [...]} and exits (0, or 1 when nginx
  refused the new file, which is then put back). Standard library only."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REQUIRED = ("upstream_file", "weights_dir", "backends")
# A host's share: roles/release splits 100 between its colours during a canary window.
DEFAULT_WEIGHT = 100


def load_config(path: str) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"error: cannot read the pool config {path}: {e}; the gateway role writes it (gateway_pool_hosts)"
        ) from None
    missing = [k for k in REQUIRED if k not in cfg]
    bad = [b for b in cfg.get("backends", []) if not b.get("name") or not b.get("address") or not b.get("ports")]
    if missing or bad:
        raise SystemExit(f"error: {path}: missing {missing}, backends without name/address/ports: {bad}")
    return cfg


def weights(cfg: dict, backend: dict) -> dict[int, int]:
    """The ports of a backend that take traffic, with their weights."""
    f = Path(cfg["weights_dir"]) / f"{backend['name']}.json"
    if not f.exists():
        return {int(p): DEFAULT_WEIGHT for p in backend["ports"]}
    try:
        given = {int(p): int(w) for p, w in json.loads(f.read_text()).items()}
    except (OSError, ValueError) as e:  # a broken file must not empty the pool: every port, as without one
        print(f"warning: {f} unreadable ({e}); probing every port of {backend['name']}", file=sys.stderr)
        return {int(p): DEFAULT_WEIGHT for p in backend["ports"]}
    return {p: w for p, w in given.items() if w > 0}


def probe(address: str, port: int, timeout: float) -> str:
    """'' when the backend is ready, else why not."""
    host = f"[{address}]" if ":" in address else address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=timeout) as r:
            return "" if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", e))[:120]


def check(cfg: dict) -> list[dict]:
    out = []
    for b in cfg["backends"]:
        for port, weight in sorted(weights(cfg, b).items()):
            why = probe(b["address"], port, float(cfg.get("timeout_s", 2)))
            out.append({"name": b["name"], "server": f"{b['address']}:{port}", "weight": weight, "down": why})
    return out


def render(cfg: dict, servers: list[dict]) -> str:
    opts = cfg.get("server_options", "")
    lines = [
        "# Written by inferd-gateway-pool (roles/gateway) from its readiness probes: edits are overwritten.",
        "upstream inferd {",
        f"    {cfg.get('balance', 'least_conn')};",
    ]
    for s in servers:
        why = f" down;  # {s['name']}: /ready {s['down']}" if s["down"] else ";"
        lines.append(f"    server {s['server']} weight={s['weight']} {opts}".rstrip() + why.replace("\n", " "))
    if not servers:  # nginx refuses an upstream without servers: every backend is drained
        lines.append("    server 127.0.0.1:9 down;  # no backend takes traffic")
    lines += [f"    keepalive {int(cfg.get('keepalive', 32))};", "}", ""]
    return "\n".join(lines)


def apply(cfg: dict, text: str) -> bool:
    """Writes the file and reloads nginx when the text differs; puts the old file back if nginx refuses it."""
    path = Path(cfg["upstream_file"])
    old = path.read_text() if path.exists() else None
    # Comments (the reasons) change with every failed probe; only the servers' set is worth a reload.
    if old is not None and _servers(old) == _servers(text):
        return False
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    test = subprocess.run(cfg.get("test_command", ["nginx", "-t", "-q"]), capture_output=True, text=True)
    if test.returncode != 0:
        if old is None:
            path.unlink()
        else:
            path.write_text(old)
        raise RuntimeError(f"nginx refused the new upstream, the old one is kept: {test.stderr.strip()[:300]}")
    subprocess.run(cfg.get("reload_command", ["systemctl", "reload", "nginx"]), check=True)
    return True


def _servers(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def once(cfg: dict) -> dict:
    # One writer at a time: the service's loop and an Ansible run (roles/release) may both call this.
    with open(cfg.get("lock_file", "/run/inferd-gateway-pool.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        servers = check(cfg)
        changed = apply(cfg, render(cfg, servers))
    if changed:
        up = [s["server"] for s in servers if not s["down"]]
        down = [f"{s['server']} ({s['down']})" for s in servers if s["down"]]
        print(f"upstream rewritten and nginx reloaded: up {up}, down {down}", file=sys.stderr, flush=True)
    return {"changed": changed, "backends": servers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true")
    mode.add_argument("--interval", type=float)
    a = ap.parse_args()
    if a.once:
        cfg = load_config(a.config)
        try:
            print(json.dumps(once(cfg)))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if a.interval <= 0:
        raise SystemExit("error: --interval must be more than 0 seconds")
    while True:
        try:
            once(load_config(a.config))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:  # logged; the next round tries again
            print(f"error: {e}", file=sys.stderr, flush=True)
        time.sleep(a.interval)


if __name__ == "__main__":
    raise SystemExit(main())
