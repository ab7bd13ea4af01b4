"""Config fields the runtime does not implement are refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from inferd import LLM
from inferd.models.config import UnsupportedModelError, parse_model_config


def load_model_config(model_dir):
    """The model directory's config.json as the engine reads it (store/source.py opens the file)."""
    return parse_model_config(json.loads((Path(model_dir) / "config.json").read_text()))


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


# The config dicts transformers' GGUF reader builds (modeling_gguf_pytorch_utils, GGUF_CONFIG_MAPPING)
# for SmolLM2-135M-Instruct and Qwen2.5-0.5B-Instruct files: general.name becomes
# `_model_name_or_path`, the tokenizer's ids come along, unk_token_id among them.
GGUF_CONFIGS = {
    "LlamaForCausalLM": {
        "model_type": "llama",
        "_model_name_or_path": "SmolLM2 135M Instruct",
        "max_position_embeddings": 8192,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "hidden_size": 576,
        "head_dim": 64,
        "rope_theta": 100000.0,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 3,
        "pad_token_id": 2,
    },
    "Qwen2ForCausalLM": {
        "model_type": "qwen2",
        "_model_name_or_path": "Qwen2.5 0.5B Instruct",
        "max_position_embeddings": 32768,
        "num_hidden_layers": 24,
        "intermediate_size": 4864,
        "hidden_size": 896,
        "rope_theta": 1000000.0,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "pad_token_id": 151643,
    },
}


@pytest.mark.parametrize("arch", sorted(GGUF_CONFIGS))
def test_an_export_converted_from_gguf_loads(tmp_path, arch):
    """from_pretrained(..., gguf_file=...) then save_pretrained, as the installed transformers writes it."""
    from transformers import AutoConfig

    gguf = GGUF_CONFIGS[arch]
    config = AutoConfig.for_model(**gguf, dtype="bfloat16")
    config.architectures = [arch]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_model_name_or_path"] == gguf["_model_name_or_path"]
    cfg = load_model_config(tmp_path)
    assert (cfg.architecture, cfg.hidden_size, cfg.num_hidden_layers) == (arch, gguf["hidden_size"], gguf["num_hidden_layers"])
    assert cfg.rope_theta == gguf["rope_theta"] and cfg.tie_word_embeddings


def test_metadata_of_hub_and_older_exports_loads(llama_dir, tmp_path):
    """What SmolLM2-135M-Instruct's own config.json and transformers 4.4x exports carry besides the shape."""
    path = _with(
        llama_dir,
        tmp_path,
        _name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        _commit_hash="12fd25f77366fa6b3b4b768ec3050bf629380bac",
        transformers_version="4.42.3",
        torch_dtype="bfloat16",
        is_llama_config=True,
        rope_interleaved=False,
        **{"transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}}},
        _attn_implementation_autoset=True,
        unk_token_id=3,
        pad_token_id=2,
        use_cache=True,
    )
    assert load_model_config(path).torch_dtype == "bfloat16"


@pytest.mark.parametrize("field,value", [("sliding_window_pattern", 4), ("foo_scale", 2), ("rope_interleaved", True)])
def test_unknown_fields_that_change_outputs_are_refused(llama_dir, tmp_path, field, value):
    path = _with(llama_dir, tmp_path, _model_name_or_path="exported from GGUF", **{field: value})
    message = (
        f"config.json field {field!r} = {value!r} is not supported: "
        "the runtime does not implement it; remove it if it is inert, or use a supported model"
    )
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
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


# ---- the server's config embeds the engine's -----------------------------------------------------
def test_the_server_config_embeds_the_engine_config_with_its_defaults():
    from inferd.config import EngineConfig
    from inferd.server.config import ServerConfig

    assert ServerConfig(model="m").engine == EngineConfig(model="m")
    cfg = ServerConfig(model="m", device="cuda", max_num_seqs=8, kv_cache_dtype="fp8")
    assert cfg.engine_config("other") == EngineConfig(model="other", device="cuda", max_num_seqs=8, kv_cache_dtype="fp8")


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("dtype", "float8", "float32, bfloat16 or float16"),
        ("device", "tpu", "'cpu' or 'cuda[:N]'"),
        ("kv_cache_dtype", "int4", "['auto', 'fp8']"),
        ("quantization", "int4", "['fp8', 'int8', 'int8_weight_only']"),
        ("kv_cache_fraction", 1.5, "(0, 1]"),
    ],
)
def test_a_bad_engine_setting_fails_the_config_naming_the_key_and_the_allowed_values(tmp_path, key, value, allowed):
    from inferd.server.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"model": "m", key: value}))
    with pytest.raises(ValueError) as e:
        load_config(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: {key}") and allowed in message, message
