"""The runtime role's settings for the host KV tier and the compile cache (issue 25 parts 6, 7):
the compile cache lives under the data directory by default (the unit's one writable place; /tmp
is private to each start), and the server resolves the role's relative path there."""

from __future__ import annotations

import sys

import pytest
import yaml
from runtime_role import LOCAL, ROOT, render_play, role_vars, run_playbook

sys.path.insert(0, str(ROOT / "runtime"))

HOSTS = {
    "defaults": {},
    "tuned": {"inference_runtime_host_kv_cache_gb": 48, "inference_runtime_compile_cache_dir": ""},
    "spec": {"inference_runtime_speculative": {"method": "ngram", "num_speculative_tokens": 3}},
    # What playbooks/assess.yml publishes on an A100 where bf16 and fp8 do not fit, and where bf16 fits.
    "a100": {"inference_runtime_device": "cuda", "gpu_assess_recommended_quantization": "int8_weight_only"},
    "roomy": {"inference_runtime_device": "cuda", "gpu_assess_recommended_quantization": "bf16"},
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    inventory = {"all": {"vars": {**role_vars(), **LOCAL}, "children": {"runtime": {"hosts": HOSTS}}}}
    r = run_playbook(tmp, inventory, [render_play("runtime", tmp)])
    assert r.returncode == 0, r.stdout[-3000:]
    return {host: yaml.safe_load((tmp / f"{host}-config.yaml").read_text()) for host in HOSTS}


def test_by_default_compiled_kernels_persist_under_the_data_directory(rendered):
    pytest.importorskip("pydantic")
    from inferd.server.config import ServerConfig

    cfg = rendered["defaults"]
    assert cfg["compile_cache_dir"] == "compile-cache" and cfg["host_kv_cache_gb"] == 0
    engine = ServerConfig(**cfg).engine_config(cfg["model"])
    assert engine.compile_cache_dir == f"{role_vars()['inference_runtime_data_dir']}/compile-cache"
    # A colour's instance gets its own data directory (--data-dir), so its own cache.
    colour = ServerConfig(**(cfg | {"data_dir": "/var/lib/inferd/colours/blue"})).engine_config(cfg["model"])
    assert colour.compile_cache_dir == "/var/lib/inferd/colours/blue/compile-cache"


def test_the_host_tier_size_reaches_the_engine_and_the_compile_cache_can_be_turned_off(rendered):
    pytest.importorskip("pydantic")
    from inferd.server.config import ServerConfig

    cfg = rendered["tuned"]
    assert "compile_cache_dir" not in cfg
    engine = ServerConfig(**cfg).engine_config(cfg["model"])
    assert engine.host_kv_cache_gb == 48 and engine.compile_cache_dir is None


def test_speculative_decoding_reaches_the_engine(rendered):
    pytest.importorskip("pydantic")
    from inferd.server.config import ServerConfig

    assert "speculative" not in rendered["defaults"]
    cfg = rendered["spec"]
    spec = ServerConfig(**cfg).engine_config(cfg["model"]).speculative
    assert (spec.method, spec.num_speculative_tokens) == ("ngram", 3)


def test_the_assessed_int8_recommendation_is_served_and_bf16_is_no_quantization(rendered):
    assert rendered["a100"]["quantization"] == "int8_weight_only"
    assert "quantization" not in rendered["roomy"]
