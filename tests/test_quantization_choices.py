"""The inference_runtime role offers exactly the quantizations the runtime serves: its
argument_specs choices are runtime/inferd/config.py's `Quantization` names plus "" (left to the
GPU assessment) and none. Read from the source, so the test needs no runtime installed."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent


def runtime_quantizations() -> list[str]:
    tree = ast.parse((ROOT / "runtime/inferd/config.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "Quantization" for t in node.targets):
            return [e.value for e in node.value.slice.elts]
    raise AssertionError("runtime/inferd/config.py defines no Quantization literal")


def test_the_role_offers_every_quantization_the_runtime_serves_and_no_other():
    specs = yaml.safe_load((ROOT / "roles/inference_runtime/meta/argument_specs.yml").read_text())
    choices = specs["argument_specs"]["main"]["options"]["inference_runtime_quantization"]["choices"]
    assert sorted(choices) == sorted(["", "none", *runtime_quantizations()])
    assert {"fp8", "int8", "int8_weight_only"} <= set(runtime_quantizations())
