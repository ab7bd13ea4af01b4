"""Every role's meta/argument_specs.yml lists exactly the keys (and defaults) of defaults/main.yml."""

from pathlib import Path

import pytest
import yaml

ROLES = sorted(p for p in (Path(__file__).parent.parent / "roles").iterdir() if (p / "defaults/main.yml").exists())


def test_there_are_roles_to_check():
    assert ROLES, "no roles with defaults/main.yml found under roles/"


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_argument_specs_match_defaults(role: Path):
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text()) or {}
    specs_file = role / "meta/argument_specs.yml"
    assert specs_file.exists(), f"{role.name}: meta/argument_specs.yml is missing"
    options = yaml.safe_load(specs_file.read_text())["argument_specs"]["main"]["options"]
    assert set(options) == set(defaults), (
        f"{role.name}: only in defaults: {sorted(set(defaults) - set(options))}; "
        f"only in argument_specs: {sorted(set(options) - set(defaults))}"
    )
    for key, value in defaults.items():
        assert options[key].get("default") == value, f"{role.name}: {key} default differs between files"
        assert options[key].get("description"), f"{role.name}: {key} has no description"


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_public_variables_carry_the_role_prefix(role: Path):
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text()) or {}
    bad = [k for k in defaults if not k.startswith(role.name + "_")]
    assert not bad, f"{role.name}: variables without the '{role.name}_' prefix: {bad}"
