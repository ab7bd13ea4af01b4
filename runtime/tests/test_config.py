"""Config fields the runtime does not implement are refused by name."""

from __future__ import annotations

import json

import pytest

from inferd import LLM
from inferd.models.config import UnsupportedModelError, load_model_config


def _with(llama_dir, tmp_path, **changes):
    raw = json.loads((llama_dir / "config.json").read_text())
    raw.update(changes)
    out = tmp_path / "m"
    out.mkdir()
    for f in llama_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "config.json").write_text(json.dumps(raw))
    return out


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_act", "gelu"),
        ("mlp_bias", True),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("use_sliding_window", True),
        ("some_new_feature", 3),
        ("architectures", ["MistralForCausalLM"]),
    ],
)
def test_unsupported_fields_are_named(llama_dir, tmp_path, field, value):
    path = _with(llama_dir, tmp_path, **{field: value})
    with pytest.raises(UnsupportedModelError, match=field):
        load_model_config(path)


def test_old_style_rope_fields_are_read(llama_dir, tmp_path):
    path = _with(
        llama_dir,
        tmp_path,
        rope_parameters=None,
        rope_theta=1234.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    )
    cfg = load_model_config(path)
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling["rope_type"] == "llama3"


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path / "nope"))
