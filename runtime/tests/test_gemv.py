"""The batch-1 GEMV pass (layers/gemv_fusion.py) and its kernel (layers/gemv.py): what the pass
fuses on Llama, Qwen2 and DeepSeek models, the readers' fallback for a deferred norm, and the
kernel's arithmetic under the Triton interpreter (float32: the interpreter multiplies nothing
else correctly; test_cuda_gemv.py checks bf16 and the engine on the GPU).

    PYTHONPATH=$PWD/runtime:/work/triton-pkgs TRITON_INTERPRET=1 pytest -q runtime/tests/test_gemv.py
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import _interpreter_scalars, needs_interpreter  # noqa: F401  (autouse fixture)

from inferd.layers.fused import add_rms_norm, rms_norm, silu_and_mul
from inferd.layers.gemv_fusion import (
    ActivatedProduct,
    ActivatedSiluAndMul,
    DeferredRMSNorm,
    GemvLinear,
    PendingNorm,
    RowwiseLMHead,
    fuse_gemv,
    plan_gemv,
)
from inferd.layers.linear import Linear, MergedLinear
from inferd.models.config import parse_model_config
from inferd.models.registry import model_class
from inferd.testing import make_model


def _model(tmp_path, arch: str):
    make_model(tmp_path, arch=arch, heads=4, kv_heads=2, layers=2)
    cfg = parse_model_config(json.loads((tmp_path / "config.json").read_text()))
    return model_class(cfg)(cfg, 64)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_pass_fuses_both_norms_and_the_silu_of_every_layer_and_nothing_else(tmp_path, arch):
    model = _model(tmp_path, arch)
    plan = plan_gemv(model)
    assert plan.traced
    layers = range(2)
    assert sorted(plan.deferred_norms) == sorted(
        f"model.layers.{i}.{n}" for i in layers for n in ("input_layernorm", "post_attention_layernorm")
    )  # the final norm feeds the LM head, which the runner calls: it stays a norm
    assert plan.silu_epilogues == [f"model.layers.{i}.mlp.gate_up_proj" for i in layers]
    assert plan.heads == ["lm_head"]
    assert sorted(plan.linears) == sorted(
        f"model.layers.{i}.{m}"
        for i in layers
        for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    )
    fuse_gemv(model)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm) is DeferredRMSNorm and type(model.model.norm).__name__ == "RMSNorm"
    assert isinstance(layer.self_attn.qkv_proj, GemvLinear) and isinstance(layer.self_attn.qkv_proj, MergedLinear)
    assert layer.mlp.gate_up_proj.silu_epilogue and not layer.mlp.down_proj.silu_epilogue
    assert type(layer.mlp.act_fn) is ActivatedSiluAndMul
    assert type(model.lm_head) is RowwiseLMHead
    # The classes keep their loaders: an in-place weight swap loads q, k and v through them.
    w = torch.randn_like(layer.self_attn.qkv_proj.weight[: layer.self_attn.q_size])
    layer.self_attn.qkv_proj.weight.weight_loader(layer.self_attn.qkv_proj.weight, w, "q")
    assert torch.equal(layer.self_attn.qkv_proj.weight[: layer.self_attn.q_size], w)


def test_on_the_cpu_a_fused_model_falls_back_to_the_plain_path(tmp_path):
    """Smoke test of the fallbacks: off CUDA no module takes its fused path (the GPU test compares
    the fused path itself)."""
    model = _model(tmp_path, "qwen2")
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    from inferd.layers.context import AttentionContext, set_context

    ids = torch.tensor([5, 9, 2])
    set_context(AttentionContext(is_prefill=True, query_lens=[3], context_lens_list=[3]))
    want = model.compute_logits(model(ids, torch.arange(3)))
    fuse_gemv(model)
    got = model.compute_logits(model(ids, torch.arange(3)))
    assert torch.equal(got, want)


def test_a_reader_that_cannot_take_the_row_finishes_the_norm_with_the_plain_kernels():
    """On the CPU (or any input the kernel does not take) a GEMV linear computes the deferred norm
    itself, and fills the residual the norm already handed on."""
    g = torch.Generator().manual_seed(0)
    x, res, nw = (torch.randn(1, 32, generator=g) for _ in range(3))
    linear = Linear(32, 8, bias=True)
    linear.weight.data.normal_(generator=g)
    linear.bias.data.normal_(generator=g)
    want_norm, want_res = add_rms_norm(x, None, None, None, res, nw, 1e-6)
    want = F.linear(want_norm, linear.weight, linear.bias)
    linear.__class__ = type("GemvLinear", (GemvLinear, Linear), {})
    res_out = torch.full_like(x, float("nan"))
    got = linear(PendingNorm(x, res, nw, 1e-6, res_out))
    assert torch.equal(got, want) and torch.equal(res_out, want_res)
    assert torch.equal(
        linear(PendingNorm(x, None, nw, 1e-6, None)),
        F.linear(rms_norm(x, None, None, None, nw, 1e-6), linear.weight, linear.bias),
    )
    act = ActivatedSiluAndMul()
    assert act(ActivatedProduct(x)) is x and torch.equal(act(torch.cat([x, res], 1)), silu_and_mul(torch.cat([x, res], 1)))


# ---- the kernel, under the interpreter -----------------------------------------------------------
def plain_path(x, w, b, norm, silu):
    """What the model computes without the GEMV pass (the compiled norm on CUDA, F.linear, SiLU)."""
    if norm is not None:
        res, nw, eps, _ = norm
        x = rms_norm(x, None, None, None, nw, eps) if res is None else add_rms_norm(x, None, None, None, res, nw, eps)[0]
    out = F.linear(x, w, b)
    return silu_and_mul(out) if silu else out


@needs_interpreter
@pytest.mark.parametrize("n,k", [(40, 72), (13, 520), (64, 1024)])  # masked rows and columns, several K tiles
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prologue", [None, "norm", "add_norm"])
@pytest.mark.parametrize("silu", [False, True])
def test_the_gemv_kernel_computes_norm_product_bias_and_silu(n, k, bias, prologue, silu):
    from inferd.layers.gemv import gemv

    g = torch.Generator().manual_seed(n + k)
    rows = 2 * n if silu else n
    x, w = torch.randn(1, k, generator=g), torch.randn(rows, k, generator=g) / k**0.5
    b = torch.randn(rows, generator=g) if bias else None
    norm = None
    if prologue:
        res = torch.randn(1, k, generator=g) if prologue == "add_norm" else None
        res_out = torch.full_like(x, float("nan")) if res is not None else None
        norm = (res, torch.randn(k, generator=g), 1e-6, res_out)
    got = gemv(x, w, b, norm=norm, silu=silu, use_pdl=False)
    torch.testing.assert_close(got, plain_path(x, w, b, norm, silu), rtol=1e-5, atol=1e-5)
    if prologue == "add_norm":
        assert torch.equal(norm[3], x + norm[0])  # program 0 wrote x + residual for the next block


@needs_interpreter
@pytest.mark.parametrize("prologue", [None, "add_norm"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
    "n,k,block_k,rows,together",
    [
        (24, 80, None, 5, None),  # one group of rows, one K tile
        (26, 100, 32, 11, 4),  # groups of 4, 4 and 3; several K tiles, the last partial; masked columns
        (26, 100, 32, 9, 8),  # groups as even as they go (5 and 4)
    ],
)
def test_the_gemv_kernel_computes_each_of_several_rows_as_a_one_row_call(prologue, silu, n, k, block_k, rows, together):
    """Rows computed as one (a verify pass): row r of a call over R rows is what the 1-row call on
    row r gives, and each row's x + residual is written for it. The input rows are strided."""
    from inferd.layers.gemv import gemv, gemv_config

    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 2 * k, generator=g)[:, :k]  # a row stride of 2k
    w = torch.randn(2 * n if silu else n, k, generator=g) / k**0.5
    b = torch.randn(w.shape[0], generator=g)
    res = torch.randn(rows, k, generator=g) if prologue else None
    nw = torch.randn(k, generator=g)

    def call(xs, rs):
        out = torch.full_like(xs, float("nan")) if rs is not None else None
        norm = (rs, nw, 1e-6, out) if prologue else None
        config = gemv_config(n, k, bool(prologue), silu) | ({"rows_together": together} if together else {})
        config |= {"BLOCK_K": block_k} if block_k else {}
        return gemv(xs, w, b, norm=norm, silu=silu, use_pdl=False, config=config), out

    got, got_res = call(x, res)
    assert got.shape == (rows, n)
    for r in range(rows):
        one, one_res = call(x[r : r + 1], res[r : r + 1] if prologue else None)
        assert torch.equal(got[r : r + 1], one), f"row {r}"
        if prologue:
            assert torch.equal(got_res[r : r + 1], one_res)
    want = plain_path(x, w, b, None if prologue is None else (res, nw, 1e-6, None), silu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_the_gemv_kernel_refuses_a_strided_row():
    from inferd.layers.gemv import gemv

    with pytest.raises(ValueError, match="contiguous elements"):
        gemv(torch.zeros(8, 2).t(), torch.zeros(4, 8))


def test_cached_contexts_are_attended_in_groups_within_the_gather_budget():
    from inferd.layers.attention import PAGED_PREFILL_BYTES, group_contexts

    assert group_contexts([], 100) == []
    assert group_contexts([40, 40, 40], 100) == [(0, 2), (2, 3)]
    assert group_contexts([40, 60, 1], 100) == [(0, 2), (2, 3)]
    assert group_contexts([500, 10, 10], 100) == [(0, 1), (1, 3)]  # a context over the budget goes alone
    per_token = 2 * 8 * 128 * 2  # K and V of one 8B layer in bf16
    assert group_contexts([1600] * 82, PAGED_PREFILL_BYTES // per_token) == [(0, 82)]  # a measured prefill step: one call
    assert len(group_contexts([8192] * 256, PAGED_PREFILL_BYTES // per_token)) == 8
    lens = [7, 300, 12, 99, 100, 1, 1, 250]
    groups = group_contexts(lens, 120)
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(lens)))
    assert all(sum(lens[a:b]) <= 120 or b - a == 1 for a, b in groups)


def test_a_residual_without_a_place_for_the_sum_is_refused():
    pytest.importorskip("triton")
    from inferd.layers.gemv import gemv

    x = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="residual_out"):
        gemv(x, torch.zeros(4, 8), norm=(torch.zeros(1, 8), torch.ones(8), 1e-6, None))


def test_a_deferred_norm_answers_shape_and_dtype_as_its_row():
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    p = PendingNorm(x, None, torch.ones(8), 1e-6, None)
    assert (p.shape, p.dtype, p.device) == (x.shape, x.dtype, x.device)
