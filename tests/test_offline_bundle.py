"""The offline switch and the offline bundle (issue 18): no apt task reaches a network when the
inventory says inferd_offline, the bundle carries every package the roles install, and the
deployment's manifest check refuses a bundle that is not the one pinned."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "roles/offline_bundle/files/verify-bundle.sh"
BUNDLE = ROOT / "scripts/bundle.sh"
APT_MODULES = {"ansible.builtin.apt", "apt", "ansible.builtin.apt_repository", "apt_repository"}


def _tasks(node):
    """Every task in a task file, blocks included."""
    for task in node or []:
        if not isinstance(task, dict):
            continue
        yield task
        for key in ("block", "rescue", "always"):
            yield from _tasks(task.get(key))


def _apt_tasks():
    for path in sorted(ROOT.glob("roles/*/tasks/*.yml")):
        for task in _tasks(yaml.safe_load(path.read_text())):
            for module in APT_MODULES & set(task):
                yield path, task.get("name", "?"), module, task[module] or {}


def test_there_are_apt_tasks_to_check():
    assert list(_apt_tasks()), "no apt tasks found under roles/*/tasks"


APT_TASKS = list(_apt_tasks())


@pytest.mark.parametrize("path,name,module,args", APT_TASKS, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in APT_TASKS])
def test_no_apt_task_refreshes_from_a_network_when_offline(path, name, module, args):
    # cache_valid_time alone turns update_cache on; apt_repository updates by default.
    updates = "update_cache" in args or "cache_valid_time" in args or module.endswith("apt_repository")
    if not updates:
        return
    where = f"{path.relative_to(ROOT)}: '{name}'"
    assert "inferd_offline" in str(args.get("update_cache", "")), (
        f"{where} refreshes apt's lists from the network; guard it: update_cache: "
        '"{{ not (inferd_offline | default(false)) }}"'
    )
    if "cache_valid_time" in args:
        assert "inferd_offline" in str(args["cache_valid_time"]), (
            f"{where}: cache_valid_time updates the cache on its own; omit it when inferd_offline"
        )


def _role_packages() -> set[str]:
    """Package names the roles' plain apt tasks install: the list literals in their name argument,
    with the roles' vars (package-name variables) resolved."""
    variables = {}
    for vars_file in ROOT.glob("roles/*/vars/main.yml"):
        variables.update(yaml.safe_load(vars_file.read_text()) or {})
    names: set[str] = set()
    for _, _, module, args in _apt_tasks():
        if module.endswith("apt_repository") or "name" not in args:
            continue
        text = str(args["name"])
        items = [i for group in re.findall(r"\[([^\[\]]*)\]", text) for i in group.split(",")]
        if isinstance(args["name"], str) and "{" not in text and "[" not in text:
            items.append(text)  # one package by name: `name: chrony`
        for var in re.findall(r"_[a-z_]+", text):
            value = variables.get(var)
            if isinstance(value, list):
                items += value
            elif isinstance(value, str):
                # The Debian choice of a distribution switch: 'nginx-light' if Debian else 'nginx'.
                items += re.findall(r"'([^']+)' if ansible_facts.distribution == 'Debian'", value)
        for item in items:
            item = item.strip().strip("'\"")
            if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", item):
                names.add(item)
    return names


def test_the_bundle_carries_every_package_the_roles_install():
    listed = re.search(r"BUNDLE_PACKAGES=\(([^)]*)\)", BUNDLE.read_text()).group(1).split()
    listed += re.search(r"BUNDLE_PACKAGES\+=\(([^)]*)\)", BUNDLE.read_text()).group(1).split()
    wanted = _role_packages()
    assert {"prometheus", "nvme-cli", "python3-venv", "nginx-light", "chrony"} <= wanted, wanted
    assert wanted <= set(listed), f"roles install packages bundle.sh leaves out: {sorted(wanted - set(listed))}"


def test_bundle_script_refuses_an_unknown_torch_build(tmp_path):
    r = subprocess.run([BUNDLE, "--torch", "rocm", tmp_path / "b"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "--torch must be cpu or cuda" in r.stderr
    assert not (tmp_path / "b").exists()


@pytest.fixture
def bundle(tmp_path):
    """A small bundle laid out as bundle.sh lays it out, and its manifest's digest."""
    root = tmp_path / "bundle"
    for rel, data in {
        "wheelhouse/inferd-0.1.0-py3-none-any.whl": b"wheel",
        "debs/Packages": b"Package: x\n",
        "model/m.packed/manifest.json": b"{}",
        "bundle.json": b"{}",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    subprocess.run(
        "find . -type f ! -name MANIFEST.sha256 -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum > MANIFEST.sha256",
        shell=True,
        cwd=root,
        check=True,
    )
    return root, hashlib.sha256((root / "MANIFEST.sha256").read_bytes()).hexdigest()


def _verify(root, digest):
    return subprocess.run([VERIFY, root, digest], capture_output=True, text=True)


def test_an_untouched_bundle_verifies(bundle):
    r = _verify(*bundle)
    assert r.returncode == 0, r.stderr
    assert "bundle verified" in r.stdout


def test_a_changed_byte_is_refused(bundle):
    root, digest = bundle
    (root / "wheelhouse/inferd-0.1.0-py3-none-any.whl").write_bytes(b"wheeL")
    r = _verify(root, digest)
    assert r.returncode == 1
    assert "do not match the manifest" in r.stderr and "inferd-0.1.0" in r.stderr


def test_a_file_outside_the_manifest_is_refused(bundle):
    root, digest = bundle
    (root / "wheelhouse/evil-1.0-py3-none-any.whl").write_bytes(b"x")
    r = _verify(root, digest)
    assert r.returncode == 1
    assert "does not list: wheelhouse/evil-1.0-py3-none-any.whl" in r.stderr


def test_a_regenerated_manifest_is_refused_by_the_pin(bundle):
    root, digest = bundle
    (root / "debs/Packages").write_bytes(b"Package: evil\n")
    manifest = "find . -type f ! -name MANIFEST.sha256 -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum"
    subprocess.run(f"{manifest} > M && mv M MANIFEST.sha256", shell=True, cwd=root, check=True)
    r = _verify(root, digest)
    assert r.returncode == 1
    assert "not to the pinned offline_bundle_manifest_sha256" in r.stderr


def test_a_directory_without_a_manifest_is_refused(tmp_path):
    r = _verify(tmp_path, "0" * 64)
    assert r.returncode == 1
    assert "has no MANIFEST.sha256" in r.stderr and "make bundle" in r.stderr


def test_the_site_scenario_is_air_gapped_with_the_bank_inventory():
    scenario = ROOT / "molecule/site"
    config = yaml.safe_load((scenario / "molecule.yml").read_text())
    # Every host (the gateway host and the second runtime host); molecule's podman driver would
    # create a `network:` itself, with a route out.
    assert [p["name"] for p in config["platforms"]] == ["molecule-site", "molecule-site-2"]
    for platform in config["platforms"]:
        assert "network" not in platform and "--network=inferd-airgap" in platform["extra_opts"]
    runner = (ROOT / "scripts/molecule-all.sh").read_text()
    assert re.search(r"podman network create --internal [^\n]*inferd-airgap", runner)
    links = config["provisioner"]["inventory"]["links"]
    assert (scenario / links["group_vars"]).resolve() == ROOT / "inventory/bank/group_vars"
    host_vars = yaml.safe_load((scenario / links["host_vars"] / "molecule-site/main.yml").read_text())
    # The second host takes the same settings (a link to the same file).
    second = scenario / links["host_vars"] / "molecule-site-2/main.yml"
    assert second.resolve() == (scenario / links["host_vars"] / "molecule-site/main.yml").resolve()
    assert host_vars["inferd_offline"] is True
    assert host_vars["inference_runtime_wheelhouse"].startswith("{{ offline_bundle_dir }}")
    assert host_vars["inference_runtime_model_src"].startswith("{{ offline_bundle_dir }}")


def _play(tmp_path, role: str, **role_vars) -> subprocess.CompletedProcess:
    """Run one role against this machine; every case here is refused before a task changes it."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(yaml.safe_dump([{"hosts": "all", "gather_facts": False, "roles": [{"role": role, "vars": role_vars}]}]))
    cmd = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
    ]
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles")}
    return subprocess.run([*cmd, str(playbook)], capture_output=True, text=True, cwd=ROOT, env=env)


def test_the_deployment_refuses_a_tampered_bundle_before_using_it(tmp_path, bundle):
    root, digest = bundle
    (root / "debs/Packages").write_bytes(b"Package: evil\n")
    r = _play(tmp_path, "offline_bundle", offline_bundle_dir=str(root), offline_bundle_manifest_sha256=digest)
    assert r.returncode != 0
    assert "files do not match the manifest: debs/Packages: FAILED" in r.stdout
    assert "Read which bundle the host holds" not in r.stdout


def test_offline_without_a_bundle_is_refused(tmp_path):
    r = _play(tmp_path, "offline_bundle", inferd_offline=True)
    assert r.returncode != 0
    assert "inferd_offline is true, so everything must come from the offline bundle" in r.stdout


def test_offline_refuses_a_network_repository(tmp_path):
    r = _play(
        tmp_path,
        "package_source",
        inferd_offline=True,
        package_source_name="grafana",
        package_source_apt_repo="deb [signed-by=/etc/apt/keyrings/grafana.asc] https://apt.grafana.com stable main",
        package_source_packages=["grafana"],
    )
    assert r.returncode != 0
    assert "inferd_offline is true, but grafana names a network repository" in r.stdout
    assert "Add the repository" not in r.stdout
