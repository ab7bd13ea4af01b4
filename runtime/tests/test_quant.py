"""FP8 weights (per output channel) and activations (per token): the CPU emulation is the
reference the CUDA path is tested against (tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.config import EngineConfig
from inferd.layers.context import AttentionContext, reset_context, set_context
from inferd.layers.fused import QuantizedRows, UnscaledProduct
from inferd.layers.linear import Linear
from inferd.layers.quant import FP8, fp8_linear, quantize_rows, quantize_weight
from inferd.server.config import ServerConfig


def test_weight_quantization_error_is_within_e4m3_precision():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different size
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and scale.shape == (1, 64)
    back = q.float() * scale.view(-1, 1)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, plus the subnormal step.
    bound = w.abs() * 2**-4 + scale.view(-1, 1) * 2**-9
    assert (back - w).abs().le(bound + 1e-12).all()
    torch.testing.assert_close(back.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)  # each row's max is exact


def test_fp8_linear_is_close_to_the_full_precision_product():
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 512), torch.randn(256, 512) / 20, torch.randn(256)
    q, scale = quantize_weight(w)
    out = fp8_linear(x, q, scale, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert (out - ref).norm() / ref.norm() < 0.05
    # A wrong scale is not close: the check above can fail.
    wrong = fp8_linear(x, q, scale * 1.5, b)
    assert (wrong - ref).norm() / ref.norm() > 0.2


def test_fp8_linear_rows_do_not_depend_on_their_batch():
    torch.manual_seed(1)
    x, w = torch.randn(16, 128), torch.randn(64, 128)
    x[3] *= 1000  # an outlier token must not coarsen the others' quantization
    q, scale = quantize_weight(w)
    batch = fp8_linear(x, q, scale, None)
    xq, row_scales = quantize_rows(x)
    for i in range(16):
        alone_q, alone_scale = quantize_rows(x[i : i + 1])
        assert torch.equal(alone_q[0].float(), xq[i].float()) and torch.equal(alone_scale[0], row_scales[i])
        torch.testing.assert_close(fp8_linear(x[i : i + 1], q, scale, None)[0], batch[i], rtol=1e-5, atol=1e-5)
    assert row_scales.shape == (16, 1) and row_scales[3] > 100 * row_scales[0]


@pytest.fixture(scope="module")
def fp8_llm(llama_dir):
    return LLM(str(llama_dir), device="cpu", dtype="float32", quantization="fp8", cpu_kv_cache_bytes=1 << 25)


def test_the_engine_holds_fp8_weights_and_keeps_the_head_in_full_precision(fp8_llm):
    model = fp8_llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == FP8 for m in linears)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def _prefill_logits(llm, ids):
    model = llm.engine.runner.model
    set_context(
        AttentionContext(
            is_prefill=True, query_lens=[len(ids)], context_lens_list=[len(ids)], slot_mapping=torch.arange(len(ids))
        )
    )
    try:
        with torch.inference_mode():
            return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))
    finally:
        reset_context()


def test_fp8_prefill_logits_stay_close_to_full_precision(fp8_llm, llama_dir):
    full = LLM(str(llama_dir), device="cpu", dtype="float32", cpu_kv_cache_bytes=1 << 25)
    ids = list(range(5, 60))
    a, b = _prefill_logits(fp8_llm, ids), _prefill_logits(full, ids)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosine.min() > 0.99, cosine.min()
    assert not torch.equal(a, b)  # really quantized


def test_fp8_greedy_tokens_alone_equal_inside_a_batch(fp8_llm):
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90, 2, 33)]
    alone = [fp8_llm.generate([p], sp)[0].token_ids for p in prompts]
    together = [o.token_ids for o in fp8_llm.generate(prompts, sp)]
    assert together == alone


def test_unknown_quantization_is_refused_by_name(llama_dir):
    with pytest.raises(ValueError, match=r"quantization must be one of \['fp8'\] or none, got 'int4'"):
        EngineConfig(model=str(llama_dir), quantization="int4")
    with pytest.raises(ValueError, match="set dtype bfloat16"):
        EngineConfig(model=str(llama_dir), device="cuda", dtype="float16", quantization="fp8")
    assert ServerConfig(model="m", quantization="fp8").engine.quantization == "fp8"
    with pytest.raises(ValueError, match="quantization"):
        ServerConfig(model="m", quantization="int4")


def test_fp8_handoffs_between_fused_kernels_change_nothing(fp8_llm):
    # Norms and SiLU-and-multiply hand the projections quantized rows, and the projections hand
    # their unscaled products on: the same arithmetic as each layer doing its own (handoff off).
    model = fp8_llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    kinds = []
    hooks = [m.register_forward_hook(lambda mod, args, out: kinds.append((type(args[0]), type(out)))) for m in linears]
    ids = list(range(3, 40))
    try:
        fused = _prefill_logits(fp8_llm, ids)
        assert {(QuantizedRows, UnscaledProduct), (torch.Tensor, UnscaledProduct)} == set(kinds)  # o_proj: attention output
        for m in linears:
            m.fp8_handoff = False
        kinds.clear()
        separate = _prefill_logits(fp8_llm, ids)
        assert set(kinds) == {(torch.Tensor, torch.Tensor)}
    finally:
        for m in linears:
            m.fp8_handoff = True
        for h in hooks:
            h.remove()
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
