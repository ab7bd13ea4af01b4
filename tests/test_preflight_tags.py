"""Every role's refusals run whatever --tags are chosen: `--tags model_storage_disk` once ran mkfs
without the partition-table and raw-data refusals, because the preflight carried only the role's
own tag. A role's preflight import comes first in tasks/main.yml and carries `always`, and so does
every assert or fail in tasks/main.yml. (package_source is a helper imported by other roles: its
check runs with its caller's install tasks, under the caller's tags.) molecule/model_storage runs
the tagged case against a disk with a partition table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if (p / "tasks/main.yml").exists())
HELPERS = {"package_source"}
REFUSALS = {"ansible.builtin.assert", "assert", "ansible.builtin.fail", "fail"}
IMPORTS = ("ansible.builtin.import_tasks", "import_tasks", "ansible.builtin.include_tasks", "include_tasks")


def tags_of(task: dict) -> list:
    tags = task.get("tags", [])
    return [tags] if isinstance(tags, str) else list(tags)


def flat_tasks(tasks: list, inherited: tuple = ()):
    """Each task with the tags it runs under, blocks opened."""
    for task in tasks or []:
        tags = inherited + tuple(tags_of(task))
        if "block" in task:
            for part in ("block", "rescue", "always"):
                yield from flat_tasks(task.get(part), tags)
        else:
            yield task, tags


def test_roles_with_a_preflight_exist():
    assert [r.name for r in ROLES if (r / "tasks/preflight.yml").exists()], "no role has tasks/preflight.yml"


@pytest.mark.parametrize("role", [r for r in ROLES if (r / "tasks/preflight.yml").exists()], ids=lambda r: r.name)
def test_preflight_is_imported_first_and_always_runs(role: Path):
    tasks = yaml.safe_load((role / "tasks/main.yml").read_text())
    first = tasks[0]
    target = next((first[k] for k in IMPORTS if k in first), None)
    assert target == "preflight.yml", f"{role.name}: the first task of tasks/main.yml is not the preflight import"
    assert "always" in tags_of(first), f"{role.name}: the preflight import lacks the tag always: {tags_of(first)}"
    assert "when" not in first, f"{role.name}: the preflight import is conditional"


@pytest.mark.parametrize("role", [r for r in ROLES if r.name not in HELPERS], ids=lambda r: r.name)
def test_every_refusal_in_main_always_runs(role: Path):
    tasks = yaml.safe_load((role / "tasks/main.yml").read_text())
    missing = [t["name"] for t, tags in flat_tasks(tasks) if REFUSALS & set(t) and "always" not in tags]
    assert not missing, f"{role.name}: refusals without the tag always: {missing}"
