"""fp8 on DeepSeek models, on the CPU: a V3/R1 fp8 block checkpoint kept as e4m3 where the device
computes fp8 blocks (the loader path selected by its flag), dequantized elsewhere and then equal to
transformers; `quantization: fp8` (a bf16 checkpoint quantized at load) on DeepSeek."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_deepseek import VARIANTS, make_deepseek, prompts, quantize_blocks

from inferd import LLM
from inferd.layers.fp8_block import FP8, weight_dequant_reference
from inferd.layers.linear import Linear
from inferd.layers.quantize import Fp8BlockExperts, Fp8BlockLinear
from inferd.loader import iter_safetensors, load_weights
from inferd.models.config import parse_model_config
from inferd.models.registry import model_class
from inferd.testing import prefill_logits

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# Experts and the shared expert on whole 128-row blocks (as V3's 2048); the dense first layer's
# gate/up (192 rows each) not, so that one stays float at load.
SHAPE = dict(hidden_size=256, intermediate_size=192, moe_intermediate_size=128)
FLOAT_IN_CHECKPOINT = "model.layers.1.self_attn.o_proj.weight"  # a projection the checkpoint left in bf16


def _fp8_checkpoint(path, twin=None):
    """A tiny V3 saved as DeepSeek publishes V3/R1: every projection e4m3 beside its
    weight_scale_inv (but one left in bf16); its dequantized float twin saved in `twin`.
    Returns the checkpoint's tensors."""
    family, overrides = VARIANTS["v3-noaux-yarn"]
    make_deepseek(path, family, **(overrides | SHAPE))
    tensors = load_file(path / "model.safetensors")
    saved, dequantized = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith(("proj.weight", "_with_mqa.weight")) and name != FLOAT_IN_CHECKPOINT:
            q, scale = quantize_blocks(t)
            saved[name], saved[name + "_scale_inv"] = q, scale
            dequantized[name] = weight_dequant_reference(q, scale)
        elif name == FLOAT_IN_CHECKPOINT:
            saved[name] = dequantized[name] = t.bfloat16()
        else:
            saved[name] = dequantized[name] = t
    save_file(saved, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": FP8_CONFIG}))
    if twin is not None:
        twin.mkdir()
        (twin / "config.json").write_text(json.dumps(config))
        save_file({n: t.float() for n, t in dequantized.items()}, twin / "model.safetensors")
    return saved


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_fp8_checkpoint_keeps_the_checkpoints_e4m3_bytes_and_scales(tmp_path, monkeypatch):
    """Where fp8 blocks are kept (CUDA 8.9+; here selected by monkeypatching the capability check
    the runner's build consults, and by load_weights' flag), the projections and experts are
    fp8 block modules as the model is built, before any weight is loaded, and hold the
    checkpoint's exact e4m3 bytes and scales; a bf16 projection is quantized to blocks as it
    loads; kv_b_proj (read as two absorbed matrices) and gate/up parts off the 128-row blocks
    load dequantized."""
    from inferd.layers import quantize

    saved = _fp8_checkpoint(tmp_path)
    cfg = parse_model_config(json.loads((tmp_path / "config.json").read_text()))
    monkeypatch.setattr(quantize, "keeps_fp8_blocks", lambda device: True)
    with quantize.fp8_blocks_as_built(cfg.weight_block_size, torch.device("cpu")):
        model = model_class(cfg)(cfg, 256)
    holder = torch.nn.Module()
    holder.proj = Linear(256, 256)
    assert type(holder.proj) is Linear  # the build's hook left with it
    assert isinstance(model.model.layers[1].mlp.experts, Fp8BlockExperts)
    assert isinstance(model.model.layers[1].self_attn.q_a_proj, Fp8BlockLinear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Linear)  # 192-row parts
    load_weights(model, iter_safetensors(tmp_path), fp8_blocks=True)

    def scale_of(name):
        return saved[name + "_scale_inv"]

    for i in (0, 1, 2):
        attn = model.model.layers[i].self_attn
        for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            module = getattr(attn, proj)
            assert module.weight.dtype == FP8, name
            if name == FLOAT_IN_CHECKPOINT:
                from inferd.layers.fp8_block import quantize_weight_blocks

                q, s = quantize_weight_blocks(saved[name])
                assert torch.equal(_bytes(module.weight), _bytes(q)) and torch.equal(module.weight_scale, s)
                continue
            assert torch.equal(_bytes(module.weight), _bytes(saved[name])), name
            assert torch.equal(module.weight_scale, scale_of(name)), name
        name = f"model.layers.{i}.self_attn.kv_b_proj.weight"
        torch.testing.assert_close(attn.kv_b_proj.weight, weight_dequant_reference(saved[name], scale_of(name)), atol=0, rtol=0)
    for i in (1, 2):
        mlp = model.model.layers[i].mlp
        for e in range(mlp.experts.w13.shape[0]):
            prefix = f"model.layers.{i}.mlp.experts.{e}"
            w13, s13 = mlp.experts.w13[e], mlp.experts.w13_scale[e]
            assert torch.equal(_bytes(w13[:128]), _bytes(saved[f"{prefix}.gate_proj.weight"]))
            assert torch.equal(_bytes(w13[128:]), _bytes(saved[f"{prefix}.up_proj.weight"]))
            assert torch.equal(s13, torch.cat([scale_of(f"{prefix}.gate_proj.weight"), scale_of(f"{prefix}.up_proj.weight")]))
            assert torch.equal(_bytes(mlp.experts.w2[e]), _bytes(saved[f"{prefix}.down_proj.weight"]))
            assert torch.equal(mlp.experts.w2_scale[e], scale_of(f"{prefix}.down_proj.weight"))
        shared = mlp.shared_experts.gate_up_proj
        prefix = f"model.layers.{i}.mlp.shared_experts"
        assert torch.equal(_bytes(shared.weight[128:]), _bytes(saved[f"{prefix}.up_proj.weight"]))
        assert torch.equal(shared.weight_scale[1:], scale_of(f"{prefix}.up_proj.weight"))
    dense = model.model.layers[0].mlp.gate_up_proj.weight
    gate = "model.layers.0.mlp.gate_proj.weight"
    torch.testing.assert_close(dense[:192], weight_dequant_reference(saved[gate], scale_of(gate)), atol=0, rtol=0)


def test_fp8_checkpoint_refuses_a_scale_of_the_wrong_shape(tmp_path):
    saved = _fp8_checkpoint(tmp_path)
    name = "model.layers.1.self_attn.q_a_proj.weight_scale_inv"
    saved[name] = torch.ones(3, 3)
    save_file(saved, tmp_path / "model.safetensors")
    cfg = parse_model_config(json.loads((tmp_path / "config.json").read_text()))
    model = model_class(cfg)(cfg, 256)
    with pytest.raises(ValueError, match=r"q_a_proj.weight.*scales \(3, 3\), the model expects .* with \(1, 2\)"):
        load_weights(model, iter_safetensors(tmp_path), fp8_blocks=True)


def test_fp8_checkpoint_dequantized_on_the_cpu_equals_transformers(tmp_path):
    """The CPU path (no fp8 blocks kept): every weight dequantized at load, teacher-forced logits
    equal to transformers' on the dequantized weights."""
    from transformers import AutoModelForCausalLM

    fp8_dir, twin = tmp_path / "fp8", tmp_path / "twin"
    fp8_dir.mkdir()
    _fp8_checkpoint(fp8_dir, twin)
    hf = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    llm = LLM(str(fp8_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22)
    assert not any(isinstance(m, (Fp8BlockLinear, Fp8BlockExperts)) for m in llm.engine.runner.model.modules())
    ids = prompts(1, seed=7)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(prefill_logits(llm, ids), ref, atol=1e-4, rtol=1e-4)


# ---- quantization: fp8 (a bf16 checkpoint quantized at load) --------------------------------------
def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _assert_fp8_close(cos: torch.Tensor) -> None:
    """Per-row cosines of fp8 logits to the float model's. Measured on these tiny random models:
    means 0.971-0.987, medians 0.985+, but single rows down to 0.79, where fp8's few-percent error
    moved a token's routing to other experts (as in the V3 fp8 block test of test_cuda_deepseek):
    so the bounds are on the mean and the median. A wrong scale or block gives ~0."""
    print(f"cosine to float: mean {cos.mean():.4f} median {cos.median():.4f} min {cos.min():.4f}")
    assert cos.mean() > 0.95 and cos.median() > 0.98, cos


@pytest.mark.parametrize("variant", ["v2-lite-greedy-yarn", "v3-noaux-yarn"])
def test_quantization_fp8_on_deepseek_quantizes_projections_and_experts(tmp_path, monkeypatch, variant):
    """`quantization: fp8` on a DeepSeek model: the projections take per-channel fp8 (quantize_fp8)
    and, where fp8 blocks compute (CUDA 8.9+, selected here by monkeypatching the runner's check;
    the block GEMMs replaced by their torch references), the stacked experts e4m3 128x128 blocks,
    so no weight but the embedding, the head, the router and kv_b_proj stays in float. Logits
    stay close to the float model's (the fp8 arithmetic's own distance: per-row cosines 0.99+ on
    the CPU); before, the experts stayed float."""
    from inferd.engine import model_runner
    from inferd.layers import quantize
    from inferd.layers.fused_moe import fused_moe_reference
    from inferd.layers.quant import can_quantize

    family, overrides = VARIANTS[variant]
    make_deepseek(tmp_path, family, **(overrides | SHAPE))
    ref = LLM(str(tmp_path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22)
    monkeypatch.setattr(model_runner, "keeps_fp8_blocks", lambda device: True)
    monkeypatch.setattr(quantize, "fused_moe", fused_moe_reference)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22, quantization="fp8")
    model = llm.engine.runner.model
    experts = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert experts and all(isinstance(e, Fp8BlockExperts) and e.w13.dtype == FP8 for e in experts)
    float_linears = [n for n, m in model.named_modules() if isinstance(m, Linear) and can_quantize(*m.weight.shape[::-1])]
    assert not float_linears
    ids = prompts(1, seed=8)[0]
    cos = _cosines(prefill_logits(llm, ids), prefill_logits(ref, ids))
    _assert_fp8_close(cos)


def test_quantization_fp8_on_deepseek_on_the_cpu_runs_per_channel_projections(tmp_path):
    """On the CPU (no fp8 block kernels) `quantization: fp8` runs: per-channel fp8 projections,
    experts in float, logits within fp8's distance of the float model's."""
    from inferd.layers.quant import can_quantize
    from inferd.layers.quantize import Fp8Linear

    family, overrides = VARIANTS["v3-noaux-yarn"]
    make_deepseek(tmp_path, family, **(overrides | SHAPE))
    ref = LLM(str(tmp_path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 22, quantization="fp8")
    model = llm.engine.runner.model
    assert isinstance(model.model.layers[1].self_attn.q_a_proj, Fp8Linear)
    assert not any(isinstance(m, Linear) and can_quantize(*m.weight.shape[::-1]) for m in model.modules())
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.float32
    ids = prompts(1, seed=8)[0]
    _assert_fp8_close(_cosines(prefill_logits(llm, ids), prefill_logits(ref, ids)))
