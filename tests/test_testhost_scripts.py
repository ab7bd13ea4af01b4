"""The test-host helpers fail with a message that says what to do, and leave nothing half-built."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH with every command of the real one except `missing`."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = bindir / name
            if name in missing or target.exists():
                continue
            src = Path(d) / name
            if os.access(src, os.X_OK) and not src.is_dir():
                target.symlink_to(src)
    return str(bindir)


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / script), *args], capture_output=True, text=True, env=env, timeout=600)


def test_no_podman_says_how_to_install_it(tmp_path):
    env = dict(os.environ, PATH=path_without(tmp_path, "podman"))
    for script, args in (("testhost-image.sh", ()), ("testhost-up.sh", ("x",)), ("testhost-down.sh", ("x",))):
        r = run(script, *args, env=env)
        assert r.returncode != 0
        assert "'podman' is not installed" in r.stderr and "make setup" in r.stderr, r.stderr


def test_missing_host_name_prints_usage():
    r = run("testhost-up.sh")
    assert r.returncode != 0 and "usage:" in r.stderr


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_no_disk_space_is_refused_before_building(small_disk):
    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    env = dict(os.environ, INFERD_CACHE_DIR=str(small_disk), TESTHOST_IMAGE_NAME="localhost/inferd-test-nospace")
    r = run("testhost-image.sh", env=env)
    assert r.returncode != 0
    assert "MB free" in r.stderr and "INFERD_CACHE_DIR" in r.stderr, r.stderr
    assert list(small_disk.iterdir()) == []


def test_a_build_that_fails_half_way_leaves_nothing_under_the_final_names(tmp_path):
    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    fake = tmp_path / "fake"
    fake.mkdir()
    # A debootstrap that writes part of a root filesystem, then dies.
    (fake / "debootstrap").write_text(
        '#!/bin/sh\nmkdir -p "$4/etc" && echo half > "$4/etc/half"\necho \'E: download failed\' >&2\nexit 1\n'
    )
    (fake / "debootstrap").chmod(0o755)
    cache = tmp_path / "cache"
    name = "localhost/inferd-test-halfway"
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", INFERD_CACHE_DIR=str(cache), TESTHOST_IMAGE_NAME=name)
    r = run("testhost-image.sh", env=env)
    assert r.returncode != 0
    assert "debootstrap failed" in r.stderr and "run again" in r.stderr, r.stderr
    assert not list(cache.glob("*.tar.zst*")), list(cache.iterdir())
    assert not list(cache.glob("rootfs.*")), "the half-built root filesystem was left behind"
    images = subprocess.run(["podman", "images", "--format", "{{.Repository}}", name], capture_output=True, text=True).stdout
    assert name not in images


def test_two_hosts_on_one_network_reach_each_other_by_name():
    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    names = ["inferd-pytest-a", "inferd-pytest-b"]
    try:
        ips = []
        for name in names:
            r = run("testhost-up.sh", name)
            assert r.returncode == 0, r.stderr
            ips.append(r.stdout.strip())
        assert ips[0] != ips[1] and all(ip.count(".") == 3 for ip in ips), ips
        state = subprocess.run(["podman", "exec", names[0], "systemctl", "is-system-running"], capture_output=True, text=True)
        assert state.stdout.strip() in ("running", "degraded")
        ping = subprocess.run(["podman", "exec", names[0], "ping", "-c1", "-W5", names[1]], capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        run("testhost-down.sh", *names)


def test_a_test_network_without_dns_is_recreated_with_it():
    """A network made before podman's DNS plugin was installed never resolves host names; setup
    (through testhost-image.sh) replaces it, and the hosts on it, with one that does."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    net = "inferd-test-nodns"
    subprocess.run(["podman", "network", "rm", "-f", net], capture_output=True)
    subprocess.run(["podman", "network", "create", "--disable-dns", net], check=True, capture_output=True)
    dns = ["podman", "network", "inspect", "-f", "{{.DNSEnabled}}", net]
    try:
        assert subprocess.run(dns, capture_output=True, text=True, check=True).stdout.strip() == "false"
        r = run("testhost-image.sh", env=dict(os.environ, TESTHOST_NETWORK=net))
        assert r.returncode == 0, r.stderr
        assert "has no DNS" in r.stderr
        assert subprocess.run(dns, capture_output=True, text=True, check=True).stdout.strip() == "true"
    finally:
        subprocess.run(["podman", "network", "rm", "-f", net], capture_output=True)
