"""The batch-1 GEMV kernels on the GPU: bf16 against the plain kernels at the real widths, with
and without programmatic dependent launch, several rows computed as one against 1-row calls, a
chain of them captured in a CUDA graph, and the engine's greedy tokens with the GEMV path against
the plain path. Skipped without CUDA.

    PYTHONPATH=$PWD/runtime pytest -q runtime/tests/test_cuda_gemv.py      # on the GPU machine
"""

from __future__ import annotations

import pytest
import torch
from test_gemv import plain_path

from inferd import LLM, SamplingParams
from inferd.testing import make_model, prefill_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _pdl_off_after():
    from inferd.layers.gemv import set_pdl

    yield
    set_pdl(False)


@pytest.mark.parametrize("n,k", [(2048, 1536), (1536, 8960), (4096, 4096), (1000, 700)])
@pytest.mark.parametrize("prologue", [None, "norm", "add_norm"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_equals_the_plain_kernels_in_bf16(n, k, prologue, silu, pdl):
    from inferd.layers.gemv import gemv, pdl_supported

    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    g = torch.Generator(device="cuda").manual_seed(n + k)
    rows = 2 * n if silu else n
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(rows, k, device="cuda", generator=g) / k**0.5).bfloat16()
    b = torch.randn(rows, device="cuda", generator=g).bfloat16()
    norm = None
    if prologue:
        res = torch.randn(1, k, device="cuda", generator=g).bfloat16() if prologue == "add_norm" else None
        norm = (
            res,
            torch.randn(k, device="cuda", generator=g).bfloat16(),
            1e-6,
            torch.empty_like(x) if res is not None else None,
        )
    got = gemv(x, w, b, norm=norm, silu=silu, use_pdl=pdl)
    want = plain_path(x, w, b, norm, silu)
    # float32 sums of the same bf16 inputs in another order: within a few bf16 roundings
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    if prologue == "add_norm":
        assert torch.equal(norm[3], x + norm[0])


@pytest.mark.parametrize("n,k", [(2048, 1536), (1536, 8960), (4096, 14336), (1000, 700)])
@pytest.mark.parametrize("prologue", [None, "add_norm"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("rows,together", [(5, None), (11, None), (11, 4)])
def test_rows_computed_as_one_are_each_the_one_row_call_bit_for_bit(n, k, prologue, silu, rows, together):
    """The compiled kernels at one row and at several (a verify pass: one group, groups of 8 made
    even, groups of 4 and a partial one) at the real widths: each row equal to its 1-row call, its
    x + residual too. The CPU test runs the interpreter, whose arithmetic does not depend on the
    layout; here the compiler's choices (layouts, fused multiply-adds) are what is checked."""
    from inferd.layers.gemv import gemv, gemv_config

    g = torch.Generator(device="cuda").manual_seed(n + k + rows)
    x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(2 * n if silu else n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    b = torch.randn(w.shape[0], device="cuda", generator=g).bfloat16()
    res = torch.randn(rows, k, device="cuda", generator=g).bfloat16() if prologue else None
    gamma = torch.randn(k, device="cuda", generator=g).bfloat16()
    config = gemv_config(n, k, bool(prologue), silu) | ({"rows_together": together} if together else {})

    def call(xs, rs):
        out = torch.empty_like(xs) if rs is not None else None
        norm = (rs, gamma, 1e-6, out) if prologue else None
        return gemv(xs, w, b, norm=norm, silu=silu, use_pdl=True, config=config), out

    got, got_res = call(x, res)
    for r in range(rows):
        one, one_res = call(x[r : r + 1], res[r : r + 1] if prologue else None)
        assert torch.equal(got[r : r + 1], one), f"row {r}"
        if prologue:
            assert torch.equal(got_res[r : r + 1], one_res), f"row {r}'s x + residual"


def test_a_chain_of_pdl_launches_in_a_cuda_graph_equals_the_same_chain_launched_plainly():
    """Each kernel waits for the one before it: a graph of 64 dependent GEMVs, each reading the
    last one's output and writing the residual the next one reads, gives the eager result."""
    from inferd.layers.gemv import gemv, pdl_supported, set_pdl

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    g = torch.Generator(device="cuda").manual_seed(7)
    h = 1024
    ws = [(torch.randn(h, h, device="cuda", generator=g) / h**0.5).bfloat16() for _ in range(64)]
    gamma = torch.ones(h, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(1, h, device="cuda", generator=g).bfloat16()

    def run():
        x, res = x0, torch.zeros_like(x0)
        for w in ws:
            out = torch.empty_like(x)
            x, res = gemv(x, w, None, norm=(res, gamma, 1e-6, out)), out
        return x, res

    set_pdl(False)
    want = run()
    set_pdl(True)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_greedy_tokens_with_the_gemv_path_follow_the_plain_path(tmp_path, arch):
    """Batch 1 goes through the GEMV kernels (CUDA graphs on); the tokens equal the plain path's
    except where its best two logits are within 0.05 (summation order)."""
    from inferd.layers.gemv_fusion import DeferredRMSNorm, GemvLinear

    make_model(tmp_path, arch=arch, vocab_size=512, hidden=256, layers=2, heads=2, kv_heads=1, intermediate=512)
    small = dict(device="cuda", max_model_len=256, max_num_seqs=8, num_kv_blocks=128)
    plain = LLM(str(tmp_path), **small, fused_gemv=False)
    fused = LLM(str(tmp_path), **small)
    model = fused.engine.runner.model
    assert any(isinstance(m, GemvLinear) for m in model.modules())
    assert any(isinstance(m, DeferredRMSNorm) for m in model.modules())
    assert not any(isinstance(m, GemvLinear) for m in plain.engine.runner.model.modules())
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for prompt in ([3, 4, 5], list(range(3, 80))):
        out = fused.generate([prompt], sp)[0]
        seq = out.prompt_token_ids + out.token_ids
        top2 = prefill_logits(plain, seq[:-1])[len(prompt) - 1 :].float().topk(2, dim=-1)
        for step, token in enumerate(out.token_ids):
            near_tie = (top2.values[step, 0] - top2.values[step, 1]).item() < 0.05
            assert token == top2.indices[step, 0].item() or near_tie, f"step {step}"
    # More rows than one take the plain kernels: a batch gives what each prompt gives alone there.
    prompts = [[3, 4, 5], list(range(3, 40)), [7] * 9]
    together = [o.token_ids for o in fused.generate(prompts, sp)]
    assert together == [o.token_ids for o in plain.generate(prompts, sp)]


@pytest.mark.parametrize("rows", [1, 5])  # a batch-1 step; a verify pass of 5 rows computed as one
@pytest.mark.parametrize("context", [1, 16, 17, 64, 65, 200, 383, 1000, 1100, 2100, 4000])
def test_early_loads_before_the_wait_give_the_late_loads_attention_bit_for_bit(rows, context):
    """Under programmatic dependent launch the rotary, KV-store, attention and merge kernels read
    what no earlier kernel of the step writes (positions, slots, context lengths, block tables,
    cached K/V) before they wait; attention reads the tile with this step's new tokens again after
    it. A graph of rotary, store and attention, whose new tokens' cache slots hold NaN before every
    replay, must give the output of the same graph with every load after the wait, and that of
    the torch reference (the longer contexts take several tiles a split)."""
    from inferd.layers import gemv
    from inferd.layers.attention import decode_attention_reference
    from inferd.layers.context import AttentionContext, reset_context, set_context
    from inferd.layers.paged_decode import paged_decode_attention, store_kv_triton
    from inferd.layers.rotary import RotaryEmbedding

    if not gemv.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    heads, kv_heads, dim, block = 12, 2, 128, 16
    g = torch.Generator(device="cuda").manual_seed(context)
    blocks = (context + rows + block) // block + 1
    k_cache = torch.randn(blocks * 2, block, kv_heads, dim, device="cuda", generator=g).bfloat16()
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(blocks * 2, device="cuda", generator=g)[:blocks].int()
    lens = torch.arange(context, context + rows, device="cuda", dtype=torch.int32)  # row j's context ends at it
    positions = (lens - 1).long()
    slots = (table[positions // block] * block + positions % block).long()
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda", generator=g).bfloat16()
    rotary = RotaryEmbedding(dim, 4096, 10000.0, None).cuda()
    set_context(AttentionContext(rows_as_one=rows > 1))

    def step():
        q, k, v = rotary(positions, qkv, heads * dim, kv_heads * dim)
        store_kv_triton(k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim), k_cache, v_cache, slots)
        return paged_decode_attention(q.view(rows, heads, dim), k_cache, v_cache, table[None].expand(rows, -1), lens, dim**-0.5)

    outs, early_before = {}, gemv._PDL["early"]
    try:
        gemv.set_pdl(True)
        for early in (False, True):
            gemv._PDL["early"] = early
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            for _ in range(3):
                k_cache.view(-1, kv_heads, dim)[slots] = float("nan")
                v_cache.view(-1, kv_heads, dim)[slots] = float("nan")
                graph.replay()
                torch.cuda.synchronize()
                assert not out.isnan().any()
                outs.setdefault(early, out.clone())
                assert torch.equal(out, outs[early])
    finally:
        gemv._PDL["early"] = early_before
        reset_context()
    assert torch.equal(outs[True], outs[False])
    gemv.set_pdl(False)
    q = rotary(positions, qkv, heads * dim, kv_heads * dim)[0].view(rows, heads, dim)
    ref = decode_attention_reference(q, k_cache, v_cache, table[None].expand(rows, -1).long(), lens, dim**-0.5)
    torch.testing.assert_close(outs[True].float(), ref.float(), atol=2e-2, rtol=2e-2)
