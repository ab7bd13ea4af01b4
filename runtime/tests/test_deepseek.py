"""DeepSeek-V2/V3: tiny random models against transformers on the CPU (float32): teacher-forced
logits and greedy tokens, engine generation (batched, chunked prefill, prefix-cache hits on the
latent cache), routing details, fp8 block checkpoints and the MTP layer skipped at load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from inferd import LLM, SamplingParams
from inferd.layers.mla_decode import mla_decode_reference
from inferd.models.config import MoEConfig, UnsupportedModelError, parse_model_config
from inferd.models.deepseek import fused_moe_ref, route
from inferd.testing import hf_greedy, prefill_logits

VOCAB = 256
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=1024,
    bos_token_id=0,
    eos_token_id=1,
)


def yarn(mscale: float, mscale_all_dim: float) -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }


VARIANTS = {
    # V2-Lite's shape: no q_lora, greedy softmax routing, two shared experts, a dense first layer, yarn
    "v2-lite-greedy-yarn": (
        "v2",
        dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy", rope_parameters=yarn(0.707, 0.707)),
    ),
    # V2's: q_lora, group-limited greedy
    "v2-group-limited": (
        "v2",
        dict(q_lora_rank=48, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2),
    ),
    # V3's: sigmoid, correction bias, noaux_tc groups, normalised and scaled weights, yarn whose
    # mscale differs from mscale_all_dim (cos/sin scaled too)
    "v3-noaux-yarn": (
        "v3",
        dict(
            q_lora_rank=48,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters=yarn(1.0, 0.8),
        ),
    ),
    # V3 with rotate-half rope, no q_lora, one group of two kept, two shared experts
    "v3-halfrope": ("v3", dict(q_lora_rank=None, n_shared_experts=2, n_group=2, topk_group=1, rope_interleave=False)),
}


def make_deepseek(path, family: str, seed: int = 0, **overrides):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    fields = SMALL | overrides
    if family == "v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**fields))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)  # the bias must matter for the test to mean anything
    model = model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def deepseek(request, tmp_path_factory):
    family, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = make_deepseek(path, family, **overrides)
    llm = LLM(str(path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22)
    return path, model, llm


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, VOCAB, (int(length),), generator=gen).tolist() for length in torch.randint(3, 40, (n,), generator=gen)
    ]


def test_teacher_forced_logits_and_tokens_match_transformers(deepseek):
    _, model, llm = deepseek
    ids = prompts(1, seed=5)[0] + prompts(1, seed=6)[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = prefill_logits(llm, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_engine_greedy_equals_transformers_generate_batched(deepseek):
    """Prefill in the expanded form, then decode in the absorbed form over the latent cache."""
    _, model, llm = deepseek
    batch = prompts(4, seed=2)
    outs = llm.generate(batch, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for ids, out in zip(batch, outs):
        assert out.token_ids == hf_greedy(model, ids, 8)


def test_chunked_prefill_and_prefix_cache_on_the_latent_cache(tmp_path):
    family, overrides = VARIANTS["v3-noaux-yarn"]
    model = make_deepseek(tmp_path, family, **overrides)
    shared = prompts(1, seed=7)[0] + prompts(1, seed=8)[0] + prompts(1, seed=9)[0]  # > 2 blocks of 16
    first, second = shared + [5, 6, 7], shared + [9, 10]
    llm = LLM(
        str(tmp_path),
        device="cpu",
        dtype="float32",
        cpu_kv_cache_bytes=1 << 22,
        max_num_batched_tokens=16,
        enable_prefix_caching=True,
    )
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    [a] = llm.generate([first], params)
    [b] = llm.generate([second], params)
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens >= 32, "the second request should reuse the shared prefix's latent blocks"
    assert a.token_ids == hf_greedy(model, first, 6)
    assert b.token_ids == hf_greedy(model, second, 6)


def test_the_cache_holds_the_latent_not_expanded_kv(deepseek):
    _, _, llm = deepseek
    runner = llm.engine.runner
    assert runner.kv_cache_layout() == (1, (32 + 8,))
    assert runner.kv_bytes_per_block() == 3 * 40 * 16 * 4  # layers x (kv_lora + rope) x block x float32
    assert runner.kv_cache.shape[:2] == (1, 3) and runner.kv_cache.shape[-1] == 40


def test_fp8_kv_cache_is_refused_for_mla(tmp_path):
    make_deepseek(tmp_path, "v2", **VARIANTS["v2-lite-greedy-yarn"][1])
    with pytest.raises(ValueError, match=r"one-byte KV cache \(kv_cache_dtype\) is not supported for the latent cache"):
        LLM(str(tmp_path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22, kv_cache_dtype="fp8")


# ---- the hot ops' references --------------------------------------------------------------------
def test_mla_decode_ref_equals_expanded_attention():
    """The absorbed form gives the expanded form's output: scores (q_nope W_UK).c = q_nope.(W_UK c)."""
    torch.manual_seed(0)
    heads, nope, rope, v_dim, kv_lora, block = 3, 8, 4, 6, 10, 4
    w_uk, w_uv = torch.randn(heads, nope, kv_lora), torch.randn(heads, v_dim, kv_lora)
    lens = [5, 9]
    cache = torch.randn(8, block, kv_lora + rope)
    tables = torch.tensor([[3, 1, 7], [0, 2, 5]], dtype=torch.int32)
    q_nope, q_rope = torch.randn(2, heads, nope), torch.randn(2, heads, rope)
    q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)
    out = mla_decode_reference(q_latent, q_rope, cache, tables, torch.tensor(lens, dtype=torch.int32), 0.3)
    for b, length in enumerate(lens):
        entries = cache[tables[b].long()].flatten(0, 1)[:length]
        c, k_rope = entries[:, :kv_lora], entries[:, kv_lora:]
        k = torch.einsum("hnc,tc->htn", w_uk, c)
        v = torch.einsum("hvc,tc->htv", w_uv, c)
        probs = ((torch.einsum("hn,htn->ht", q_nope[b], k) + q_rope[b] @ k_rope.T) * 0.3).softmax(-1)
        expected = torch.einsum("ht,htv->hv", probs, v)
        torch.testing.assert_close(torch.einsum("hc,hvc->hv", out[b], w_uv), expected, atol=1e-4, rtol=1e-4)


def test_fused_moe_ref_equals_a_loop_over_tokens():
    torch.manual_seed(0)
    tokens, dim, inter, experts = 5, 6, 4, 4
    hidden, w13, w2 = torch.randn(tokens, dim), torch.randn(experts, 2 * inter, dim), torch.randn(experts, dim, inter)
    ids = torch.tensor([[0, 2], [2, 3], [1, 0], [3, 3 - 1], [0, 1]])
    weights = torch.rand(tokens, 2)
    out = fused_moe_ref(hidden, w13, w2, weights, ids)
    for t in range(tokens):
        want = sum(
            weights[t, j] * (w2[e] @ (torch.nn.functional.silu(w13[e, :inter] @ hidden[t]) * (w13[e, inter:] @ hidden[t])))
            for j, e in enumerate(ids[t].tolist())
        )
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


# ---- routing ------------------------------------------------------------------------------------
def moe_config(**fields) -> MoEConfig:
    base = dict(
        n_routed_experts=8,
        n_shared_experts=0,
        num_experts_per_tok=2,
        moe_intermediate_size=4,
        first_k_dense_replace=0,
        moe_layer_freq=1,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    return MoEConfig(**(base | fields))


def logits_for(probs: list[float]) -> torch.Tensor:
    """Router logits whose sigmoid scores are `probs`."""
    p = torch.tensor([probs], dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def test_noaux_tc_negative_bias_next_to_a_masked_group():
    """Hand-checked. Groups of two: {0,1} {2,3} {4,5} {6,7}. Expert 2 has the best raw score but a
    bias of -0.5: its group's biased top-2 sum (0.4 + 0.3) loses to groups {0,1} (0.7 + 0.6) and
    {6,7} (0.5 + 0.45); so group {2,3} is masked, and expert 2 is not chosen although its unbiased
    score is the best. The weights are the unbiased scores, normalised, times 2.5."""
    probs = [0.7, 0.6, 0.9, 0.3, 0.2, 0.1, 0.5, 0.45]
    bias = torch.tensor([0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    weights, ids = route(logits_for(probs), bias, moe_config())
    order = weights[0].argsort(descending=True)
    assert ids[0][order].tolist() == [0, 1]
    torch.testing.assert_close(weights[0][order], torch.tensor([0.7, 0.6]) / 1.3 * 2.5)
    # Without the bias, group {2,3} (0.9 + 0.3 = 1.2) beats {6,7} (0.95), and expert 2 wins.
    _, ids = route(logits_for(probs), None, moe_config())
    assert sorted(ids[0].tolist()) == [0, 2]


def test_noaux_tc_group_score_is_the_top_two_sum_not_the_max():
    """A tie across a group boundary: expert 3 (group {2,3}) and expert 4 (group {4,5}) both score
    0.8. The top-2 sums (1.05, 0.9, 1.55, 0.1) separate their groups: {4,5} and {0,1} are kept,
    and the three best experts in them are 0, 4 and 5."""
    probs = [0.85, 0.2, 0.1, 0.8, 0.8, 0.75, 0.05, 0.05]
    weights, ids = route(logits_for(probs), torch.zeros(8), moe_config(num_experts_per_tok=3))
    assert sorted(ids[0].tolist()) == [0, 4, 5]
    torch.testing.assert_close(weights[0].sum(), torch.tensor(2.5))


def test_group_limited_greedy_scores_groups_by_their_best_expert():
    """Softmax scores; groups {0,1} {2,3} {4,5} {6,7}; group maxima 0.30, 0.12, 0.13, 0.2
    (expert 6): the top two groups are {0,1} and {6,7}; weights are the raw softmax scores times
    the scaling factor (not normalised)."""
    probs = torch.tensor([[0.30, 0.05, 0.12, 0.11, 0.13, 0.01, 0.2, 0.08]])
    cfg = moe_config(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.5)
    weights, ids = route(probs.log(), None, cfg)
    assert sorted(ids[0].tolist()) == [0, 6]
    torch.testing.assert_close(weights[0].sort(descending=True).values, torch.tensor([0.30, 0.2]) * 1.5)


def test_softmax_weights_are_normalised_when_norm_topk_prob():
    """DeepSeek-V2's gate normalises the chosen softmax scores when norm_topk_prob is set
    (transformers' V2 router ignores the field; V2-Lite leaves it off)."""
    probs = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    cfg = moe_config(n_routed_experts=4, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax")
    weights, ids = route(probs.log(), None, cfg)
    assert sorted(ids[0].tolist()) == [0, 2]
    torch.testing.assert_close(weights[0].sort(descending=True).values, torch.tensor([0.4, 0.3]) / 0.7 * 2.5)


def test_moe_layer_freq_and_dense_first_layers_place_the_experts():
    """The reference's rule: layer i has experts when i >= first_k_dense_replace and
    i % moe_layer_freq == 0 (transformers ignores moe_layer_freq, so this is checked here)."""
    from inferd.models.deepseek import DeepseekMoE, DeepseekV2ForCausalLM

    raw = {"architectures": ["DeepseekV2ForCausalLM"], **SMALL, "num_hidden_layers": 6, "moe_layer_freq": 2}
    cfg = parse_model_config(raw | {"q_lora_rank": None, "n_shared_experts": 1})
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg, 64)
    assert [isinstance(layer.mlp, DeepseekMoE) for layer in model.model.layers] == [False, False, True, False, True, False]


@pytest.mark.parametrize("ties", [False, True])
def test_routing_equals_transformers_routers(ties):
    """Many random tokens (and, with `ties`, scores rounded to a coarse grid so groups and experts
    tie at group boundaries) through our `route` and transformers' routers."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(3)
    hidden = torch.randn(200, 16)
    if ties:
        hidden = hidden.round()
    common = dict(
        hidden_size=16,
        num_attention_heads=2,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    )
    v3 = DeepseekV3TopkRouter(DeepseekV3Config(**common, norm_topk_prob=True))
    v2 = DeepseekV2TopkRouter(DeepseekV2Config(**common, topk_method="group_limited_greedy"))
    with torch.no_grad():
        for router in (v2, v3):
            router.weight.normal_(0, 0.5)
            if ties:
                router.weight.copy_(router.weight.round())
        v3.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 16) if not ties else torch.zeros(16))
    cases = [
        (v3, moe_config(n_routed_experts=16, num_experts_per_tok=4), v3.e_score_correction_bias),
        (
            v2,
            moe_config(
                n_routed_experts=16,
                num_experts_per_tok=4,
                topk_method="group_limited_greedy",
                scoring_func="softmax",
                norm_topk_prob=False,
            ),
            None,
        ),
    ]
    for router, cfg, bias in cases:
        with torch.no_grad():
            logits, ref_w, ref_ids = router(hidden)
        weights, ids = route(logits, bias, cfg)
        # Same experts (as sets: topk order is not part of the result) with the same weights.
        ref = torch.zeros(200, 16).scatter_(1, ref_ids, ref_w)
        ours = torch.zeros(200, 16).scatter_(1, ids, weights)
        torch.testing.assert_close(ours, ref)


# ---- config -------------------------------------------------------------------------------------
def v2_lite_config(**changes) -> dict:
    """The published DeepSeek-V2-Lite config.json's fields (DEEPSEEK-FACTS.md), with changes."""
    raw = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"},
        "aux_loss_alpha": 0.001,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 102400,
    }
    return raw | changes


def test_published_v2_lite_config_is_read():
    cfg = parse_model_config(v2_lite_config())
    assert cfg.mla.q_lora_rank is None and cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim == 576
    assert (
        cfg.moe.topk_method == "greedy"
        and cfg.moe.n_shared_experts == 2
        and cfg.moe.is_moe_layer(1)
        and not cfg.moe.is_moe_layer(0)
    )
    assert cfg.rope_scaling["rope_type"] == "yarn"


def test_v3_config_with_fp8_blocks_and_mtp_is_read():
    raw = v2_lite_config(
        architectures=["DeepseekV3ForCausalLM"],
        q_lora_rank=1536,
        n_routed_experts=256,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        quantization_config={
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    )
    cfg = parse_model_config(raw)
    assert cfg.weight_block_size == (128, 128) and cfg.num_nextn_predict_layers == 1
    assert cfg.moe.n_group == 8 and cfg.moe.scoring_func == "sigmoid"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"topk_method": "sinkhorn"}, "topk_method"),
        ({"scoring_func": "sqrtsoftplus"}, "scoring_func"),
        ({"n_group": 3}, "n_group"),
        ({"made_up_field": 1}, "made_up_field"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),  # V2 has none
    ],
)
def test_unsupported_deepseek_fields_are_refused_by_name(changes, field):
    with pytest.raises(UnsupportedModelError, match=field):
        parse_model_config(v2_lite_config(**changes))


def test_yarn_is_refused_for_llama():
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "vocab_size": 100,
    }
    with pytest.raises(UnsupportedModelError, match="rope_scaling"):
        parse_model_config(raw | {"rope_scaling": yarn(1.0, 1.0)})


# ---- weights ------------------------------------------------------------------------------------
def quantize_blocks(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight as DeepSeek's fp8 checkpoints store it: e4m3 values, one scale per block."""
    n, k = weight.shape
    rows, cols = -(-n // block), -(-k // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:n, :k] = weight
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block, cols * block)[:n, :k]
    return q.contiguous(), scale


def test_fp8_block_checkpoint_loads_like_its_dequantized_twin_and_mtp_is_skipped(tmp_path):
    """A V3 checkpoint with e4m3 weights + weight_scale_inv (blocks of 128 over weights that are
    not multiples of 128) and an MTP layer loads to the logits of its dequantized float twin."""
    family, overrides = VARIANTS["v3-noaux-yarn"]
    fp8_dir, twin_dir = tmp_path / "fp8", tmp_path / "twin"
    make_deepseek(fp8_dir, family, hidden_size=160, **overrides)
    tensors = load_file(fp8_dir / "model.safetensors")
    quantized, twin = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith("proj.weight") and "layernorm" not in name:
            q, scale = quantize_blocks(t)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            scales = scale.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            twin[name] = q.float() * scales
        else:
            quantized[name] = twin[name] = t
    # The MTP layer: its tensors are in the checkpoint and must not be loaded (or refused).
    quantized["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)
    save_file(quantized, fp8_dir / "model.safetensors")
    config = json.loads((fp8_dir / "config.json").read_text())
    twin_dir.mkdir()
    (twin_dir / "config.json").write_text(json.dumps(config))
    save_file(twin, twin_dir / "model.safetensors")
    config |= {
        "num_nextn_predict_layers": 1,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    (fp8_dir / "config.json").write_text(json.dumps(config))
    ids = prompts(1, seed=4)[0]
    fp8 = prefill_logits(LLM(str(fp8_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22), ids)
    ref = prefill_logits(LLM(str(twin_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22), ids)
    torch.testing.assert_close(fp8, ref, atol=1e-5, rtol=1e-5)
    assert any(q.dtype == torch.float8_e4m3fn for q in quantized.values())


def test_fp8_weight_without_its_scale_is_refused(tmp_path):
    from inferd.loader import dequantize_fp8_blocks

    w = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="without their weight/weight_scale_inv partner"):
        list(dequantize_fp8_blocks(iter([("a.weight", w)]), (128, 128)))
