"""INT8 on the GPU: the kernels against the CPU-exact references in bfloat16, and the engine's
greedy tokens against bf16's (CUDA graphs on). Skipped without CUDA; imports no server module.

    PYTHONPATH=$PWD/runtime pytest -q runtime/tests/test_cuda_int8.py      # on the GPU machine
"""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.layers.int8 import (
    Int8Linear,
    int8_mm,
    quantize_rows_int8,
    quantize_weight_int8,
    scale_int32,
    w8a8_linear,
    w8a16_linear,
    w8a16_reference,
)
from inferd.testing import make_model, prefill_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS = [1, 7, 16, 17, 64, 300]  # GEMV tiles, _int_mm's padding below 17 rows, the larger tiles


def _case(m, n=384, k=512, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    x = torch.randn(m, k, device="cuda", generator=g)
    b = torch.randn(n, device="cuda", generator=g)
    return w, x, b


@pytest.mark.parametrize("m", ROWS)
def test_int_mm_with_padding_is_the_exact_int32_product(m):
    w, x, _ = _case(m)
    wq, _ = quantize_weight_int8(w)
    xq, _ = quantize_rows_int8(x)
    assert torch.equal(int8_mm(xq, wq).cpu(), int8_mm(xq.cpu(), wq.cpu()))


@pytest.mark.parametrize("m", ROWS)
def test_triton_w8a8_kernel_equals_the_int32_reference(m):
    from inferd.layers.int8_kernels import w8a8_matmul

    w, x, b = _case(m, seed=1)
    wq, ws = quantize_weight_int8(w)
    xq, xs = quantize_rows_int8(x.bfloat16())
    want = scale_int32(int8_mm(xq, wq), xs, ws, b.bfloat16(), torch.bfloat16)
    got = w8a8_matmul(xq, xs, wq, ws, b.bfloat16(), torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # the same float32 sums, one bf16 rounding


@pytest.mark.parametrize("m", ROWS)
def test_w8a8_linear_on_cuda_equals_the_cpu_reference(m):
    w, x, b = _case(m, seed=2)
    wq, ws = quantize_weight_int8(w)
    x16 = x.bfloat16()
    got = w8a8_linear(x16, wq, ws, b.bfloat16())
    want = w8a8_linear(x16.cpu().float(), wq.cpu(), ws.cpu(), b.bfloat16().float().cpu())
    torch.testing.assert_close(got.float().cpu(), want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("m", ROWS)
def test_triton_w8a16_kernel_equals_the_widened_weight_product(m):
    w, x, b = _case(m, seed=3)
    wq, ws = quantize_weight_int8(w)
    x16, b16 = x.bfloat16(), b.bfloat16()
    got = w8a16_linear(x16, wq, ws, b16)
    want = w8a16_reference(x16.float(), wq, ws, b16.float())  # float32 sums of the same bf16 inputs
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small Llama with the real head_dim (128) and widths that are multiples of 8."""
    path = tmp_path_factory.mktemp("cuda-int8")
    make_model(path, arch="llama", vocab_size=512, hidden=256, layers=2, heads=2, kv_heads=1, intermediate=512)
    return path


@pytest.mark.parametrize("quantization", ["int8", "int8_weight_only"])
def test_engine_greedy_tokens_follow_bf16(model_dir, quantization):
    """Greedy tokens equal bf16's except where bf16's best two logits are within 0.25 (the margin
    test_int8.py justifies for int8 rounding on random tiny models), graphs and eager alike."""
    # A fixed cache for both engines: a fraction is of the whole card, which the first engine holds part of.
    small = dict(device="cuda", max_model_len=256, max_num_seqs=8, num_kv_blocks=128)
    bf16 = LLM(str(model_dir), **small)
    quant = LLM(str(model_dir), **small, quantization=quantization)
    linears = [m for m in quant.engine.runner.model.modules() if isinstance(m, Int8Linear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    layer = quant.engine.runner.model.model.layers[0]
    writers = (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.act_fn)
    want_rows = "int8" if quantization == "int8" else None  # W8A8: the norms and SiLU hand int8 rows
    assert all(getattr(w, "hands_rows", None) == want_rows for w in writers)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90)]
    alone = [quant.generate([p], sp)[0].token_ids for p in prompts]
    together = quant.generate(prompts, sp)
    assert [o.token_ids for o in together] == alone  # batch invariance: per-token scales
    for out in together:
        seq = out.prompt_token_ids + out.token_ids
        top2 = prefill_logits(bf16, seq[:-1])[len(out.prompt_token_ids) - 1 :].float().topk(2, dim=-1)
        for step, token in enumerate(out.token_ids):
            near_tie = (top2.values[step, 0] - top2.values[step, 1]).item() < 0.25
            want = top2.indices[step, 0].item()
            assert token == want or near_tie, f"step {step}: {quantization} {token}, bf16 {want}"
