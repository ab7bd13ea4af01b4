"""Read and check a Hugging Face config.json without depending on `transformers`.

Every field is either understood (and its value checked), or known to have no effect on
inference outputs. Anything else is an error that names the field: a silent difference in
outputs is worse than a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    pass


# Fields that do not change what the model computes at inference time: the one list of them.
# Ordinary exports carry these (LlamaForCausalLM / Qwen2ForCausalLM saved by transformers 4.4x
# and 5.x, including models converted from GGUF, and the Hub's own config.json files); any other
# field with a set value is refused by name.
INERT_FIELDS = {
    # names, versions and provenance
    "architectures",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",  # GGUF's general.name, kept by from_pretrained(..., gguf_file=...)
    "_commit_hash",
    "is_llama_config",  # nanotron's marker (SmolLM2)
    "transformers.js_config",  # settings of transformers.js's ONNX runtime (SmolLM2)
    "tokenizer_class",
    # dtype hints: the engine's dtype is its own setting
    "torch_dtype",
    "dtype",
    # transformers' cache, output and attention-implementation flags
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "_attn_implementation_autoset",
    "chunk_size_feed_forward",
    # training only
    "initializer_range",
    "attention_dropout",
    "embd_pdrop",
    "resid_pdrop",
    "pretraining_tp",
    # special-token ids (eos_token_id is read; the engine stops on it and on the tokenizer's)
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",  # GGUF's tokenizer.ggml.unknown_token_id
    "sep_token_id",
    "decoder_start_token_id",
    # heads and tasks this runtime does not build
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "task_specific_params",
    "prefix",
    "is_encoder_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    # Qwen2: the layers sliding-window attention would start at, refused when it is on
    "max_window_layers",
}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: list[int]
    torch_dtype: str | None


ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _fail(field: str, value, why: str) -> None:
    raise UnsupportedModelError(f"config.json field {field!r} = {value!r} is not supported: {why}")


def parse_model_config(raw: dict) -> ModelConfig:
    raw = dict(raw)
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        _fail("architectures", archs, f"supported: {sorted(ARCHITECTURES)}")
    arch = archs[0]
    used: set[str] = set()

    def take(name, default=None, required=False):
        used.add(name)
        if name not in raw:
            if required:
                raise UnsupportedModelError(f"config.json lacks the required field {name!r}")
            return default
        return raw[name]

    hidden = take("hidden_size", required=True)
    heads = take("num_attention_heads", required=True)
    kv_heads = take("num_key_value_heads") or heads
    if heads % kv_heads:
        _fail("num_key_value_heads", kv_heads, f"must divide num_attention_heads ({heads})")
    head_dim = take("head_dim") or hidden // heads

    if take("hidden_act", "silu") != "silu":
        _fail("hidden_act", raw["hidden_act"], "only silu is implemented")
    if take("mlp_bias", False):
        _fail("mlp_bias", True, "MLP biases are not implemented")
    if take("attention_dropout", 0.0) not in (0, 0.0, None):
        pass  # dropout is off at inference
    # Rope: transformers < 5 writes rope_theta + rope_scaling, transformers >= 5 rope_parameters.
    rope = take("rope_parameters") or {}
    scaling = take("rope_scaling")
    theta = take("rope_theta") or rope.get("rope_theta", 10000.0)
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = rope
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type") or scaling.get("type")
        scaling["rope_type"] = rope_type
        if rope_type not in ("default", "llama3"):
            _fail("rope_scaling", scaling, "supported rope types: default, llama3")
        if rope_type == "default":
            scaling = None
    # Qwen2: sliding-window attention is not implemented; refuse only when it is on.
    if take("use_sliding_window", False):
        _fail("use_sliding_window", True, "sliding-window attention is not implemented")
    take("sliding_window")
    layer_types = take("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        _fail("layer_types", sorted(set(layer_types)), "only full_attention layers are implemented")
    attention_bias = bool(take("attention_bias", arch == "Qwen2ForCausalLM"))
    if arch == "Qwen2ForCausalLM" and not attention_bias and "attention_bias" in raw:
        _fail("attention_bias", False, "Qwen2 checkpoints always carry q/k/v biases")
    eos = take("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    cfg = ModelConfig(
        architecture=arch,
        vocab_size=take("vocab_size", required=True),
        hidden_size=hidden,
        intermediate_size=take("intermediate_size", required=True),
        num_hidden_layers=take("num_hidden_layers", required=True),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=take("rms_norm_eps", 1e-6),
        max_position_embeddings=take("max_position_embeddings", 4096),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(take("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        eos_token_ids=eos_ids,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )
    for name, value in raw.items():
        if name in used or name in INERT_FIELDS:
            continue
        if value in (None, False, 0, 0.0, {}, []):
            continue  # an unset optional feature
        _fail(name, value, "the runtime does not implement it; remove it if it is inert, or use a supported model")
    return cfg
