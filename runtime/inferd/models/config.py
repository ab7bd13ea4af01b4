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
    # DeepSeek: training losses, expert-parallel degree of the training run, remote-code pointers,
    # and values transformers derives from fields read below (MLA has no key/value heads)
    "aux_loss_alpha",
    "seq_aux",
    "router_aux_loss_coef",
    "output_router_logits",
    "ep_size",
    "auto_map",
    "qk_head_dim",
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
    # DeepSeek V2/V3 only: Multi-head Latent Attention and the mixture of experts.
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    # fp8 checkpoints (V3/R1): [128, 128] when weights come as e4m3 with `weight_scale_inv` blocks
    weight_block_size: tuple[int, int] | None = None
    # multi-token-prediction layers after the last decoder layer (V3): not run, their weights skipped
    num_nextn_predict_layers: int = 0


@dataclass
class MLAConfig:
    q_lora_rank: int | None  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # rope dims in (even, odd) pairs, as DeepSeek's checkpoints are laid out


@dataclass
class MoEConfig:
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    topk_method: str  # greedy | group_limited_greedy | noaux_tc
    scoring_func: str  # softmax | sigmoid
    norm_topk_prob: bool
    routed_scaling_factor: float

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_k_dense_replace and index % self.moe_layer_freq == 0


ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "DeepseekV2ForCausalLM": "deepseek",
    "DeepseekV3ForCausalLM": "deepseek",
}
DEEPSEEK = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
# rope scaling types each family implements
ROPE_TYPES = {"deepseek": ("default", "yarn"), "llama": ("default", "llama3"), "qwen2": ("default", "llama3")}


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
    if heads % kv_heads and arch not in DEEPSEEK:
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
        supported = ROPE_TYPES[ARCHITECTURES[arch]]
        if rope_type not in supported:
            _fail("rope_scaling", scaling, f"supported rope types for {arch}: {', '.join(supported)}")
        if rope_type == "yarn" and "original_max_position_embeddings" not in scaling:
            _fail("rope_scaling", scaling, "yarn needs original_max_position_embeddings")
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

    if arch in DEEPSEEK:
        mla, moe = _parse_deepseek(arch, take)
        head_dim = mla.qk_rope_head_dim  # what transformers writes as head_dim: the rope part
        kv_heads = heads  # MLA has no separate key/value heads; the field transformers writes is inert
    else:
        mla = moe = None
    block_size, nextn = _parse_quantization(arch, take("quantization_config")), take("num_nextn_predict_layers", 0) or 0
    if nextn and arch != "DeepseekV3ForCausalLM":
        _fail("num_nextn_predict_layers", nextn, "multi-token-prediction layers exist only in DeepseekV3ForCausalLM")

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
        mla=mla,
        moe=moe,
        weight_block_size=block_size,
        num_nextn_predict_layers=int(nextn),
    )
    for name, value in raw.items():
        if name in used or name in INERT_FIELDS:
            continue
        if value in (None, False, 0, 0.0, {}, []):
            continue  # an unset optional feature
        _fail(name, value, "the runtime does not implement it; remove it if it is inert, or use a supported model")
    return cfg


def _parse_deepseek(arch: str, take) -> tuple[MLAConfig, MoEConfig]:
    """The MLA and MoE fields of DeepseekV2/V3 configs; defaults are transformers' for each."""
    v3 = arch == "DeepseekV3ForCausalLM"
    mla = MLAConfig(
        q_lora_rank=take("q_lora_rank", 1536),
        kv_lora_rank=take("kv_lora_rank", 512),
        qk_nope_head_dim=take("qk_nope_head_dim", 128),
        qk_rope_head_dim=take("qk_rope_head_dim", 64),
        v_head_dim=take("v_head_dim", 128),
        rope_interleave=bool(take("rope_interleave", True)),
    )
    if mla.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", mla.qk_rope_head_dim, "must be even (rotary pairs)")
    take("num_key_value_heads")
    take("head_dim")
    experts = take("n_routed_experts", 256 if v3 else 64)
    moe = MoEConfig(
        n_routed_experts=experts,
        n_shared_experts=take("n_shared_experts", 1 if v3 else 2) or 0,
        num_experts_per_tok=take("num_experts_per_tok", 8 if v3 else None),
        moe_intermediate_size=take("moe_intermediate_size", 2048 if v3 else 1407),
        first_k_dense_replace=take("first_k_dense_replace", 3 if v3 else 0),
        moe_layer_freq=take("moe_layer_freq", 1),
        n_group=take("n_group") or 1,
        topk_group=take("topk_group") or 1,
        topk_method=take("topk_method") or ("noaux_tc" if v3 else "greedy"),
        scoring_func=take("scoring_func") or ("sigmoid" if v3 else "softmax"),
        norm_topk_prob=bool(take("norm_topk_prob", v3)),
        routed_scaling_factor=float(take("routed_scaling_factor", 2.5 if v3 else 1.0)),
    )
    if not moe.num_experts_per_tok or not 0 < moe.num_experts_per_tok <= experts:
        _fail("num_experts_per_tok", moe.num_experts_per_tok, f"must be between 1 and n_routed_experts ({experts})")
    if moe.topk_method not in TOPK_METHODS:
        _fail("topk_method", moe.topk_method, f"supported: {', '.join(TOPK_METHODS)}")
    if moe.scoring_func not in SCORING_FUNCS:
        _fail("scoring_func", moe.scoring_func, f"supported: {', '.join(SCORING_FUNCS)}")
    if moe.moe_layer_freq < 1:
        _fail("moe_layer_freq", moe.moe_layer_freq, "must be >= 1")
    if experts % moe.n_group:
        _fail("n_group", moe.n_group, f"must divide n_routed_experts ({experts})")
    if not 1 <= moe.topk_group <= moe.n_group:
        _fail("topk_group", moe.topk_group, f"must be between 1 and n_group ({moe.n_group})")
    if moe.num_experts_per_tok > moe.topk_group * (experts // moe.n_group):
        _fail("num_experts_per_tok", moe.num_experts_per_tok, "is more than the experts of topk_group groups")
    if moe.topk_method == "noaux_tc" and experts // moe.n_group < 2:
        _fail("n_group", moe.n_group, "noaux_tc scores a group by its top two experts: groups need two or more")
    return mla, moe


def _parse_quantization(arch: str, quant: dict | None) -> tuple[int, int] | None:
    """fp8 checkpoints with 128x128 weight blocks (DeepSeek-V3/R1); other formats are refused."""
    if not quant:
        return None
    quant = dict(quant)
    if arch not in DEEPSEEK or quant.get("quant_method") != "fp8":
        _fail("quantization_config", quant, "only DeepSeek's fp8 block checkpoints (quant_method fp8) are read")
    if quant.get("fmt", "e4m3") != "e4m3" or quant.get("activation_scheme", "dynamic") != "dynamic":
        _fail("quantization_config", quant, "only e4m3 weights with dynamic activation scales are read")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        _fail("quantization_config", quant, "weight_block_size must be two positive integers, e.g. [128, 128]")
    return (block[0], block[1])
