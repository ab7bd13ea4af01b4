"""INT8 weights (per output channel), with activations per token (W8A8, `int8`) or in the model's
dtype (W8A16, `int8_weight_only`): the quantizers, the exact int32 product, the Triton kernels
under the interpreter, and the engine on tiny Llama / Qwen2 models against float32.

    PYTHONPATH=$PWD/runtime:/work/triton-pkgs TRITON_INTERPRET=1 pytest -q runtime/tests/test_int8.py

(the kernel cases are skipped without the interpreter; test_cuda_int8.py runs them on the GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from triton_interpreter import INTERPRETER, _interpreter_scalars, needs_interpreter  # noqa: F401  (autouse fixture)

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig
from inferd.layers.int8 import (
    INT8_MAX,
    Int8Linear,
    int8_mm,
    quantize_rows_int8,
    quantize_weight_int8,
    scale_int32,
    w8a8_linear,
    w8a16_reference,
)
from inferd.layers.linear import Linear
from inferd.layers.quantize import quantize_int8
from inferd.testing import make_model, prefill_logits


# ---- the quantizers -------------------------------------------------------------------------------
def test_weight_round_trip_error_is_at_most_half_a_step_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    w[5] *= 1000  # an outlier channel must not coarsen the others (one scale per output channel)
    w[9] = 0  # a row of zeros: zero codes, no division by zero
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (1, 48) and scale.dtype == torch.float32
    assert q.abs().max() == INT8_MAX and (q != -128).all()  # symmetric: -128 never used
    err = (q.float() * scale.view(-1, 1) - w).abs()
    assert (err <= scale.view(-1, 1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(q[9], torch.zeros(64, dtype=torch.int8)) and torch.isfinite(scale).all()
    assert scale[0, 5] > 500 * scale[0, 4]
    assert (err[4] <= w[4].abs().max() / INT8_MAX / 2 * (1 + 1e-6)).all()


def test_activation_scales_are_per_token_so_an_outlier_token_changes_no_other_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g)
    x[3] *= 1000
    x[7] = 0
    q, scale = quantize_rows_int8(x)
    assert scale.shape == (16, 1) and scale[3] > 100 * scale[0]
    assert torch.equal(q[7], torch.zeros(64, dtype=torch.int8))
    for i in (0, 3, 15):
        alone_q, alone_scale = quantize_rows_int8(x[i : i + 1])
        assert torch.equal(alone_q[0], q[i]) and torch.equal(alone_scale[0], scale[i])
    assert ((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_int8_product_is_exact_int32():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (5, 4096), generator=g, dtype=torch.int8)  # 5 rows: below _int_mm's CUDA minimum
    b = torch.randint(-127, 128, (24, 4096), generator=g, dtype=torch.int8)
    assert torch.equal(int8_mm(a, b), (a.long() @ b.long().t()).int())


def _error_bound(x, w, weight_only: bool):
    """|x w^T - x̂ ŵ^T| ≤ Σ_k |x_k| e_w + |w_k| e_x + e_x e_w per output, with e = scale / 2 the
    largest rounding error of each quantized operand (e_x = 0 when x is not quantized)."""
    _, w_scale = quantize_weight_int8(w)
    e_w = w_scale.view(1, -1) / 2
    if weight_only:
        return x.abs().sum(-1, keepdim=True) * e_w
    _, x_scale = quantize_rows_int8(x)
    e_x = x_scale / 2
    k = x.shape[-1]
    return x.abs().sum(-1, keepdim=True) * e_w + e_x * w.abs().sum(-1).view(1, -1) + k * e_x * e_w


@pytest.mark.parametrize("weight_only", [False, True], ids=["w8a8", "w8a16"])
def test_int8_linear_is_within_the_rounding_bound_of_the_float_product(weight_only):
    g = torch.Generator().manual_seed(3)
    w, x, b = torch.randn(40, 72, generator=g), torch.randn(7, 72, generator=g), torch.randn(40, generator=g)
    x[2] *= 50  # an outlier token
    wq, ws = quantize_weight_int8(w)
    out = (w8a16_reference if weight_only else w8a8_linear)(x, wq, ws, b)
    exact = x.double() @ w.double().t() + b.double()
    err = (out.double() - exact).abs()
    bound = _error_bound(x.double(), w.double(), weight_only)
    assert (err <= bound * (1 + 1e-4) + 1e-4).all(), (err / bound).max()
    # and a wrong scale is caught by the same bound: the check has teeth
    wrong = (w8a16_reference if weight_only else w8a8_linear)(x, wq, ws * 1.5, b)
    assert ((wrong.double() - exact).abs() > bound).any()


def test_w8a8_rows_do_not_depend_on_their_batch():
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(32, 64, generator=g), torch.randn(20, 64, generator=g)
    x[3] *= 1000
    wq, ws = quantize_weight_int8(w)
    batch = w8a8_linear(x, wq, ws, None)
    for i in range(20):
        assert torch.equal(w8a8_linear(x[i : i + 1], wq, ws, None)[0], batch[i])


def test_the_pass_keeps_layers_whose_shape_int8_does_not_allow():
    model = nn.Module()
    model.ok, model.odd = Linear(64, 32), Linear(12, 20)
    swapped = quantize_int8(model)
    assert swapped == ["ok"] and isinstance(model.ok, Int8Linear) and type(model.odd) is Linear
    assert model.ok.weight.dtype == torch.int8 and not model.ok.weight_only


def _w8a8_with_and_without_handoffs(path):
    """Two W8A8 engines on the same weights: as built (row handoffs), and with every handoff
    taken out again (each projection quantizing its own input)."""
    fused, alone = _llm(path, quantization="int8"), _llm(path, quantization="int8")
    for m in alone.engine.runner.model.modules():
        if getattr(m, "hands_rows", None):
            m.hands_rows = None
    return fused, alone


def _assert_same_logits_and_tokens(a, b, ids: list[int], prompts: list[list[int]], max_tokens: int) -> None:
    assert torch.equal(prefill_logits(a, ids), prefill_logits(b, ids))
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in a.generate(prompts, sp)] == [o.token_ids for o in b.generate(prompts, sp)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_w8a8_norms_and_silu_hand_their_projections_int8_rows_with_the_same_tokens(arch, tmp_path):
    """W8A8's row handoffs: the norms before q/k/v and gate/up and the SiLU before down quantize
    their own output (one kernel instead of two); the final norm (read by the float LM head) does
    not. The arithmetic is the projection's own quantization, so the logits are unchanged."""
    from inferd.layers.fused import QuantizedRows
    from inferd.layers.quantize import Fp8RMSNorm, Fp8SiluAndMul

    make_model(tmp_path, arch=arch, heads=4, kv_heads=2)
    fused, alone = _w8a8_with_and_without_handoffs(tmp_path)
    model = fused.engine.runner.model
    for layer in model.model.layers:
        for writer in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.act_fn):
            assert isinstance(writer, (Fp8RMSNorm, Fp8SiluAndMul)) and writer.hands_rows == "int8"
    assert not getattr(model.model.norm, "hands_rows", None)
    rows = model.model.layers[0].input_layernorm(torch.randn(3, model.config.hidden_size))
    assert isinstance(rows, QuantizedRows) and rows.q.dtype == torch.int8 and rows.scale.shape == (3, 1)

    _assert_same_logits_and_tokens(fused, alone, list(range(5, 60)), [list(range(3, 3 + n)) for n in (5, 40)], 12)


def test_w8a8_on_a_dense_deepseek_model_hands_rows_to_mla_whose_code_reads_their_shape(tmp_path):
    """MLA reads its input's shape (the token count) besides projecting it: the input norm still
    hands int8 rows on (the trace ignores metadata reads), and the rows answer `.shape`."""
    from test_deepseek import VARIANTS, make_deepseek

    from inferd.layers.quantize import Fp8RMSNorm

    make_deepseek(tmp_path, "v2", **(VARIANTS["v2-lite-greedy-yarn"][1] | {"first_k_dense_replace": 3}))
    quant, alone = _w8a8_with_and_without_handoffs(tmp_path)
    norm = quant.engine.runner.model.model.layers[0].input_layernorm
    assert isinstance(norm, Fp8RMSNorm) and norm.hands_rows == "int8"
    _assert_same_logits_and_tokens(quant, alone, list(range(3, 40)), [list(range(3, 20)), list(range(5, 9))], 8)


def test_weight_only_int8_and_the_untraceable_keep_plain_norms():
    model = nn.Module()
    model.ok = Linear(64, 32)
    quantize_int8(model, weight_only=True)
    assert isinstance(model.ok, Int8Linear)  # nothing to trace: no norm changed class, no crash


# ---- the Triton kernels, under the interpreter -------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("n", [64, 40])  # a power of two, and a masked row
def test_triton_silu_and_mul_hands_the_int8_rows_the_reference_makes(n):
    from inferd.layers.fused import silu_and_mul
    from inferd.layers.triton_fused import silu_and_mul_triton

    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, 2 * n, generator=g) * 3
    q, scale = silu_and_mul_triton(x, quant="int8")
    want_q, want_scale = silu_and_mul(x, quant="int8")
    assert q.dtype == torch.int8 and scale.shape == (7, 1)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    # Triton's division is within 2 ulp of IEEE's: a quotient at a .5 tie may round the other way.
    assert (q.int() - want_q.int()).abs().max() <= 1 and (q != want_q).float().mean() < 0.01
    assert q.abs().max() == 127  # each row's largest magnitude maps to the top code


if INTERPRETER:  # a kernel's helpers resolve in its module's globals
    import triton
    import triton.language as tl

    from inferd.layers.triton_fused import _round_half_even

    @triton.jit
    def _rounding(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, _round_half_even(tl.load(x_ptr + offs)))


@needs_interpreter
def test_the_int8_rounding_breaks_ties_to_even_as_torch_round():
    x = torch.tensor([-127.0, -2.5, -1.5, -0.5, -0.49, 0.0, 0.5, 0.51, 1.5, 2.5, 3.5, 126.5, 2.4999, -3.7, 7.5, 8.5])
    out = torch.empty_like(x)
    _rounding[(1,)](x, out, N=x.numel())
    assert torch.equal(out, torch.round(x))


@needs_interpreter
@pytest.mark.parametrize("m", [1, 5, 17, 70])  # GEMV tiles, the middle and the large ones, all masked
@pytest.mark.parametrize("bias", [False, True])
def test_triton_w8a8_kernel_equals_the_int32_reference(m, bias):
    from inferd.layers.int8_kernels import w8a8_matmul

    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(40, 72, generator=g), torch.randn(m, 72, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    wq, ws = quantize_weight_int8(w)
    xq, xs = quantize_rows_int8(x)
    want = scale_int32(int8_mm(xq, wq), xs, ws, b, torch.float32)
    torch.testing.assert_close(w8a8_matmul(xq, xs, wq, ws, b, torch.float32), want, rtol=1e-6, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("m", [1, 5, 70])
def test_triton_w8a16_kernel_equals_the_widened_weight_product(m):
    """float32 activations: the interpreter multiplies only float32 correctly (test_deepseek_kernels.py);
    test_cuda_int8.py checks bfloat16 on the GPU."""
    from inferd.layers.int8_kernels import w8a16_matmul

    g = torch.Generator().manual_seed(10 + m)
    w, x, b = torch.randn(40, 72, generator=g), torch.randn(m, 72, generator=g), torch.randn(40, generator=g)
    wq, ws = quantize_weight_int8(w)
    torch.testing.assert_close(w8a16_matmul(x, wq, ws, b), w8a16_reference(x, wq, ws, b), rtol=1e-5, atol=1e-5)


# ---- the engine ---------------------------------------------------------------------------------------
# Random tiny models have many near-tied logits; where float32's best two logits are closer than
# NEAR_TIE either token is a right greedy choice. The largest logit difference int8 made on these
# models was 0.087 (W8A8) and 0.064 (W8A16) over logits of +-2.7 (and 0.33 for fp8), so a margin of
# 0.25 (about 3x that) cannot be flipped by int8 rounding; a real bug (a wrong scale, a transposed
# weight) moves logits by far more.
NEAR_TIE = 0.25
# fp8's bound in test_quant.py is 0.99; int8 keeps 7 bits per value against e4m3's 3 and measured
# 0.9991 (W8A8) and 0.9995 (W8A16) at worst on these models.
MIN_COSINE = 0.998


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"int8-{request.param}")
    make_model(path, arch=request.param, heads=4, kv_heads=2)
    return path


def _llm(path, **kw):
    return LLM(str(path), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 25, **kw)


@pytest.mark.parametrize("quantization", ["int8", "int8_weight_only"])
def test_int8_engine_logits_and_greedy_tokens_follow_float32(tiny_dir, quantization):
    full, quant = _llm(tiny_dir), _llm(tiny_dir, quantization=quantization)
    model = quant.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    assert all(m.weight_only == (quantization == "int8_weight_only") for m in linears)
    assert not any(isinstance(m, Linear) for m in model.modules()), "a projection kept float weights"
    assert model.lm_head.weight.dtype == torch.float32

    ids = list(range(5, 60))
    a, b = prefill_logits(quant, ids), prefill_logits(full, ids)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > MIN_COSINE
    assert not torch.equal(a, b)  # really quantized

    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for out in quant.generate([list(range(3, 3 + n)) for n in (5, 40, 17)], sp):
        seq = out.prompt_token_ids + out.token_ids
        top2 = prefill_logits(full, seq[:-1])[len(out.prompt_token_ids) - 1 :].topk(2, dim=-1)
        for step, token in enumerate(out.token_ids):
            near_tie = (top2.values[step, 0] - top2.values[step, 1]).item() < NEAR_TIE
            want = top2.indices[step, 0].item()
            assert token == want or near_tie, f"step {step}: int8 {token}, float32 {want}"


def test_int8_greedy_tokens_alone_equal_inside_a_batch(llama_dir):
    llm = _llm(llama_dir, quantization="int8")
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90, 2)]
    alone = [llm.generate([p], sp)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, sp)] == alone


def test_the_config_accepts_both_int8_names_and_names_them_when_refusing(llama_dir):
    for name in ("int8", "int8_weight_only"):
        assert EngineConfig(model=str(llama_dir), quantization=name).quantization == name
    with pytest.raises(ValueError, match=r"\['fp8', 'int8', 'int8_weight_only'\] or none, got 'int4'"):
        EngineConfig(model=str(llama_dir), quantization="int4")
    with pytest.raises(ValueError, match="int8 on CUDA computes in bfloat16"):
        EngineConfig(model=str(llama_dir), device="cuda", dtype="float16", quantization="int8")


def test_int8_is_served_on_gpus_without_fp8_and_refused_before_turing(monkeypatch):
    from inferd.layers.quant import check_supported

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    for name in ("int8", "int8_weight_only"):
        check_supported(name, cuda)  # the A100: no fp8, int8 tensor cores
    with pytest.raises(ValueError, match="fp8 needs compute capability 8.9"):
        check_supported("fp8", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(ValueError, match="int8 needs compute capability 7.5 or newer"):
        check_supported("int8", cuda)
