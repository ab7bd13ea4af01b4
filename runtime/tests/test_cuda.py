"""The CUDA path (Triton paged decode, CUDA graphs, bf16), run on the GPU machine through the
device tool; skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.layers.attention import decode_attention_reference
from inferd.testing import prefill_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (12, 2, 128), (4, 4, 64)])
@pytest.mark.parametrize(
    "dtype,cache_dtype", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.float8_e4m3fn)]
)
@pytest.mark.parametrize("batch", [1, 5, 40])  # split-K for small batches, one pass for large ones
def test_triton_paged_decode_matches_reference(heads, kv_heads, head_dim, dtype, cache_dtype, batch):
    from inferd.layers.paged_decode import paged_decode_attention

    torch.manual_seed(0)
    args = _paged_decode_case(batch, heads, kv_heads, head_dim, dtype, cache_dtype or dtype)
    q, k_cache, v_cache, tables, context_lens, scale = args
    out = paged_decode_attention(*args)
    ref = decode_attention_reference(q, k_cache, v_cache, tables.long(), context_lens, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _paged_decode_case(batch, heads, kv_heads, head_dim, dtype, cache_dtype, spread: float = 1.0) -> tuple:
    """(q, k_cache, v_cache, block_tables, context_lens, scale) for `paged_decode_attention`: caches
    of 21 blocks of 16 tokens a sequence, contexts of ragged lengths (one token to 21 blocks' worth)."""
    block_size, num_blocks = 16, 21 * 40
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(*shape, device="cuda", dtype=dtype).mul(spread).to(cache_dtype)
    v_cache = torch.randn(*shape, device="cuda", dtype=dtype).mul(spread).to(cache_dtype)
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
    context_lens = torch.tensor([333, 1, 17, 64, 200] * 8, device="cuda", dtype=torch.int32)[:batch]
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)[: batch * 21].view(batch, 21)
    return q, k_cache, v_cache, tables, context_lens, head_dim**-0.5


@pytest.mark.parametrize("batch", [1, 40])
def test_fp8_v_widened_in_registers_equals_the_cast(batch):
    """The inline-asm widening of an fp8 V (the engine's launch) against Triton's own cast, signs,
    subnormals and ragged tails included: a wrong byte order would move values across columns."""
    from inferd.layers.paged_decode import paged_decode_attention

    torch.manual_seed(1)
    args = _paged_decode_case(batch, 32, 8, 128, torch.bfloat16, torch.float8_e4m3fn, spread=4.0)
    fast = paged_decode_attention(*args, compute_dtype=torch.float16, widen_v_in_registers=True)
    cast = paged_decode_attention(*args, compute_dtype=torch.float16, widen_v_in_registers=False)
    # The same products, though not always summed in the same order (the two stage V through
    # shared memory in different layouts): equal to a bf16 rounding.
    torch.testing.assert_close(fast.float(), cast.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("vocab", [151936, 128256, 1009])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_argmax_kernels_find_the_first_maximum_as_torch_does(vocab, dtype):
    """The two Triton passes of a few rows' greedy token (chunk winners, then the row's) against
    torch.argmax: ties across and inside chunks (the first wins), the last column, equal rows,
    a row of -inf, NaN (larger than +inf, as torch counts it), a vocabulary of one partial chunk."""
    from inferd.layers.triton_fused import argmax_rows

    g = torch.Generator(device="cuda").manual_seed(vocab)
    logits = torch.randn(8, vocab, device="cuda", generator=g).to(dtype)
    logits[1, 7] = logits[1, vocab - 9] = 50
    logits[2, 1000] = logits[2, 1001] = 50
    logits[3, -1] = 50
    logits[4] = 0
    logits[5] = float("-inf")
    logits[6, 600] = logits[6, vocab - 2] = float("nan")
    logits[6, 500] = float("inf")  # before the NaN: torch still takes the NaN
    for rows in (1, 3, 8):
        assert argmax_rows(logits[:rows]).tolist() == logits[:rows].argmax(dim=-1).tolist()
    assert argmax_rows(logits).tolist()[1:7] == [7, 1000, vocab - 1, 0, 0, 600]


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    # Each engine takes most of the free GPU memory for its KV cache: release it between tests.
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_triton_store_kv_writes_what_the_reference_writes(cache_dtype):
    from inferd.layers.attention import store_kv
    from inferd.layers.paged_decode import store_kv_triton

    torch.manual_seed(0)
    qkv = torch.randn(70, 8 * 128 + 2 * 2 * 128, device="cuda", dtype=torch.bfloat16) * 100
    k = qkv[:, 1024:1280].reshape(70, 2, 128)  # rows of a wider tensor, as after the q/k/v split
    v = qkv[:, 1280:].reshape(70, 2, 128)
    slots = torch.randperm(40 * 16, device="cuda")[:70]
    caches = []
    for store in (store_kv, store_kv_triton):
        kc = torch.zeros(40, 16, 2, 128, device="cuda", dtype=cache_dtype)
        vc = torch.zeros_like(kc)
        store(k, v, kc, vc, slots)
        caches.append((kc.view(torch.uint8), vc.view(torch.uint8)) if cache_dtype.itemsize == 1 else (kc, vc))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_cuda_engine_matches_cpu_engine_and_transformers(tiny_model):
    path, model, tokenizer = tiny_model
    prompts = ["The quick brown fox", "Banks and hospitals run DeepSeek models on their own GPU servers."]
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    cpu = [o.token_ids for o in LLM(str(path), device="cpu", dtype="float32").generate(prompts, sp)]
    gpu_llm = LLM(str(path), device="cuda", dtype="float32")
    assert gpu_llm.engine.runner.graphs, "CUDA graphs were not captured"
    gpu = [o.token_ids for o in gpu_llm.generate(prompts, sp)]
    assert gpu == cpu
    ref = [
        model.generate(
            torch.tensor([tokenizer(p).input_ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None
        )[0, len(tokenizer(p).input_ids) :].tolist()
        for p in prompts
    ]
    assert gpu == ref


def test_cuda_bf16_batch_of_16_runs_through_graphs(llama_dir):
    llm = LLM(str(llama_dir), device="cuda", dtype="bfloat16", cuda_graph_max_batch=16)
    outs = llm.generate(
        [[3 + i] * (5 + 7 * i) for i in range(16)], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    )
    assert all(len(o.token_ids) == 40 for o in outs)
    assert 16 in llm.engine.runner.graphs


def test_overlapped_cuda_steps_match_the_cpu_engine_in_and_beyond_the_graph_buckets(llama_dir):
    # Six sequences with different lengths: the batch shrinks from 6 (eager, above the largest
    # graph bucket) through the graphs for 4, 2 and 1; every decode step takes its input tokens
    # from the previous step's sampled tokens on the device.
    prompts = [list(range(3 + i, 10 + 9 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=8 + 6 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    cpu = [o.token_ids for o in LLM(str(llama_dir), device="cpu", dtype="float32").generate(prompts, params)]
    llm = LLM(str(llama_dir), device="cuda", dtype="float32", cuda_graph_max_batch=4, kv_cache_fraction=0.3)
    assert max(llm.engine.runner.graphs) == 4
    pending = []
    launch = llm.engine.runner.launch

    def recording(seqs, is_prefill, prev=None):
        pending.extend(s.has_pending_token for s in seqs if not is_prefill)
        return launch(seqs, is_prefill, prev)

    llm.engine.runner.launch = recording
    assert [o.token_ids for o in llm.generate(prompts, params)] == cpu
    assert pending and all(pending), "a decode step waited for the previous step's tokens"
    del llm.engine.runner.launch


def test_structured_output_and_top_logprobs_run_through_cuda_graphs(llama_dir):
    # A constrained row beside free rows: the token bitmask and the top-k logprobs are applied in
    # the sampler, after the graph's logits, so decode still replays graphs; the documents are
    # valid and every value equals the CPU engine's (float32, greedy).
    import json

    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 30}},
        "required": ["kind", "age"],
        "additionalProperties": False,
    }
    prompts = ["The quick brown fox", "hello", "Banks and hospitals"]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5),
        SamplingParams(max_tokens=60, temperature=0.0, json_schema=schema, logprobs=True, top_logprobs=2),
        SamplingParams(max_tokens=60, temperature=1.0, seed=4, json_schema={"type": "object"}),
    ]
    cpu = LLM(str(llama_dir), device="cpu", dtype="float32").generate(prompts, params)
    llm = LLM(str(llama_dir), device="cuda", dtype="float32", cuda_graph_max_batch=4, kv_cache_fraction=0.3)
    replays = []
    for bs, graph in llm.engine.runner.graphs.items():
        graph.replay = (lambda g, b: lambda: (replays.append(b), g())[1])(graph.replay, bs)
    gpu = llm.generate(prompts, params)
    assert replays, "decode left the CUDA graphs"
    assert [o.token_ids for o in gpu[:2]] == [o.token_ids for o in cpu[:2]]
    assert json.loads(gpu[1].text)["kind"] in ("cat", "dog") and gpu[1].finish_reason == "stop"
    assert gpu[2].finish_reason == "length" or isinstance(json.loads(gpu[2].text), dict)
    for g, c in zip(gpu[:2], cpu[:2]):
        assert g.logprobs == pytest.approx(c.logprobs, abs=1e-3)
        assert [[t for t, _ in alts] for alts in g.top_logprobs] == [[t for t, _ in alts] for alts in c.top_logprobs]


def test_prompt_logprobs_on_cuda_match_the_cpu_engine(llama_dir):
    sp = SamplingParams(max_tokens=2, temperature=0.0, logprobs=True, top_logprobs=3, prompt_logprobs=True)
    prompt = "Paged attention keeps the KV cache in fixed-size blocks."
    cpu = LLM(str(llama_dir), device="cpu", dtype="float32").generate([prompt], sp)[0]
    gpu = LLM(str(llama_dir), device="cuda", dtype="float32", kv_cache_fraction=0.3).generate([prompt], sp)[0]
    assert gpu.prompt_logprobs[0] is None and len(gpu.prompt_logprobs) == len(cpu.prompt_logprobs)
    for g, c in zip(gpu.prompt_logprobs[1:], cpu.prompt_logprobs[1:]):
        assert g[0] == pytest.approx(c[0], abs=1e-3)
        assert [t for t, _ in g[1]] == [t for t, _ in c[1]]


def test_fp8_kv_cache_on_cuda_matches_the_cpu_engine_with_one(llama_dir):
    # The Triton store and decode kernels against the CPU reference, both over fp8 K/V, in
    # float32 compute (bf16 compute would differ from the CPU for its own reasons).
    prompts = [list(range(3 + i, 30 + 11 * i)) for i in range(5)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    cpu = LLM(str(llama_dir), device="cpu", dtype="float32", kv_cache_dtype="fp8").generate(prompts, sp)
    llm = LLM(str(llama_dir), device="cuda", dtype="float32", kv_cache_dtype="fp8", kv_cache_fraction=0.3)
    assert llm.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert [o.token_ids for o in llm.generate(prompts, sp)] == [o.token_ids for o in cpu]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_pinned_stager_copies_tensors_larger_than_its_ring(dtype):
    from inferd.loader import PinnedStager

    stager = PinnedStager(torch.device("cuda"), slot_bytes=4096, slots=2)
    assert all(s.is_pinned() for s in stager.slots)
    for shape in [(7,), (333, 129), (3, 5, 1001)]:
        host = (torch.randn(shape) * 50).to(dtype)
        dev = stager.to_device(host)
        assert dev.is_cuda and dev.dtype == dtype and dev.shape == host.shape
        assert torch.equal(dev.cpu(), host)


def test_pinned_stager_does_not_overwrite_memory_the_current_stream_still_reads():
    # A weight loader queues a copy from the staged tensor on the current stream and drops it;
    # the next tensor's device memory is then likely the same block. Here the current stream is
    # kept busy, so that copy runs late: the stager must not write the block before it has.
    from inferd.loader import PinnedStager

    stager = PinnedStager(torch.device("cuda"), slot_bytes=1 << 20, slots=2)
    dsts = [torch.empty(1 << 18, device="cuda") for _ in range(6)]
    for i, dst in enumerate(dsts):
        staged = stager.to_device(torch.full((1 << 18,), float(i)))
        torch.cuda._sleep(20_000_000)  # ~10 ms of a busy current stream
        dst.copy_(staged)
        del staged
    torch.cuda.synchronize()
    assert [dst.unique().tolist() for dst in dsts] == [[float(i)] for i in range(6)]


def test_a_second_engine_in_one_process_loads_the_same_weights(llama_dir):
    first = LLM(str(llama_dir), device="cuda", dtype="float32", kv_cache_fraction=0.2, enforce_eager=True)
    weights = {n: p.detach().cpu() for n, p in first.engine.runner.model.named_parameters()}
    del first
    torch.cuda.empty_cache()
    second = LLM(str(llama_dir), device="cuda", dtype="float32", kv_cache_fraction=0.2, enforce_eager=True)
    for name, p in second.engine.runner.model.named_parameters():
        assert torch.equal(p.detach().cpu(), weights[name]), name


needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs compute capability 8.9+"
)


@needs_fp8
@pytest.mark.parametrize("rows", [1, 7, 64, 300, 600, 2048])  # tensor-wise below ROWWISE_MIN_ROWS, row-wise above
def test_fp8_scaled_mm_matches_the_cpu_emulation(rows):
    from inferd.layers.quant import fp8_linear, quantize_weight

    torch.manual_seed(0)
    x = (torch.randn(rows, 4096) * torch.logspace(-2, 1, rows).unsqueeze(1)).bfloat16()
    w = (torch.randn(6144, 4096) / 64).bfloat16()
    q, scale = quantize_weight(w.cuda())
    out = fp8_linear(x.cuda(), q, scale, None).float().cpu()
    ref = fp8_linear(x.float(), q.cpu(), scale.cpu(), None)
    assert out.dtype == torch.float32 and out.shape == (rows, 6144)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().amax().item())
    full = torch.nn.functional.linear(x.float(), w.float())
    assert (out - full).norm() / full.norm() < 0.05


@needs_fp8
def test_fp8_engine_runs_through_cuda_graphs_close_to_bf16(llama_dir):
    from inferd.layers.linear import Linear
    from inferd.layers.quant import FP8
    from inferd.layers.quantize import Fp8Linear, quantize_fp8

    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    fp8 = LLM(str(llama_dir), device="cuda", dtype="bfloat16", quantization="fp8", kv_cache_fraction=0.3)
    assert fp8.engine.runner.graphs, "CUDA graphs were not captured"
    modules = list(fp8.engine.runner.model.modules())
    assert not any(isinstance(m, Linear) for m in modules), "a projection kept bf16 weights"
    fp8_linears = [m for m in modules if isinstance(m, Fp8Linear)]
    assert fp8_linears and all(m.weight.dtype == FP8 and m.hands_product for m in fp8_linears)
    # The handoffs traced on the meta twin of a CUDA model, as on the CPU (test_quant.py).
    assert all(layer.input_layernorm.hands_rows and layer.mlp.act_fn.hands_rows for layer in fp8.engine.runner.model.model.layers)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 90)]
    outs = fp8.generate(prompts, sp)
    assert all(len(o.token_ids) == 16 for o in outs)
    bf16 = LLM(str(llama_dir), device="cuda", dtype="bfloat16", kv_cache_fraction=0.6)
    ids = list(range(5, 60))
    fused = prefill_logits(fp8, ids).float()
    cosine = torch.nn.functional.cosine_similarity(fused, prefill_logits(bf16, ids).float(), dim=-1)
    assert cosine.min() > 0.98, cosine.min()
    # The same fp8 weights with every layer doing its own quantize and scale work (the bf16
    # engine's CUDA graphs are not replayed after this): the handoffs move work between kernels,
    # and change the arithmetic only by where bf16 rounds before an activation is quantized (a
    # value rounded twice can land on the neighbouring e4m3 step). Measured on the H200
    # (2026-11-30): cosine 0.9931 at the worst of 55 positions, 0.998 typical; a wrong scale or a
    # missing norm weight drops far below.
    quantize_fp8(bf16.engine.runner.model, handoffs=False)
    cosine = torch.nn.functional.cosine_similarity(fused, prefill_logits(bf16, ids).float(), dim=-1)
    assert cosine.min() > 0.99, cosine.min()


@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (12, 2), (4, 4)])
def test_varlen_prefill_attention_matches_the_reference_loop(heads, kv_heads):
    from types import SimpleNamespace

    from inferd.layers.attention import prefill_attention_reference, prefill_attention_varlen

    torch.manual_seed(0)
    lens = [5, 130, 1, 77, 512]
    total, d = sum(lens), 128
    q = torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    ctx = SimpleNamespace(query_lens=lens, context_lens_list=lens, cu_seqlens=cu, max_query_len=max(lens), block_tables=None)
    out = prefill_attention_varlen(q, k, v, ctx, d**-0.5)
    ref = prefill_attention_reference(q, k, v, None, None, ctx, d**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (12, 2, 128), (4, 4, 64)])
@pytest.mark.parametrize("form", ["plain", "fp8-product", "fp8-product-bias"])
@pytest.mark.parametrize("tokens", [1, 70])
def test_triton_qkv_rotary_matches_the_reference(heads, kv_heads, head_dim, form, tokens):
    from inferd.layers.fused import qkv_rotary
    from inferd.layers.rotary import RotaryEmbedding
    from inferd.layers.triton_fused import qkv_rotary_triton

    torch.manual_seed(0)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    n = q_size + 2 * kv_size
    rope = RotaryEmbedding(head_dim, 4096, 500000.0, None).cuda()
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    x = torch.randn(tokens, n, device="cuda").bfloat16()  # results of order 1: the tolerances bite
    x_scale = w_scale = bias = None
    if form != "plain":  # an fp8 product: large values, scaled down by the token and channel scales
        x = x * 100
        x_scale = torch.rand(tokens, 1, device="cuda") + 0.5
        w_scale = torch.rand(1, n, device="cuda") / 100 + 0.005
        bias = torch.randn(n, device="cuda").bfloat16() if form.endswith("bias") else None
    args = (positions, x, x_scale, w_scale, bias, rope.cos_sin, head_dim, q_size, kv_size)
    # The reference runs eagerly in bf16 (each operation rounds), the kernel in float32 rounding
    # once: they differ by a few bf16 steps, a wrong sign, half, position or scale by far more.
    ref = qkv_rotary(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    out = qkv_rotary_triton(*args)
    for o, r, size in zip(out, ref, (q_size, kv_size, kv_size)):
        assert o.shape == (tokens, size) and o.dtype == torch.bfloat16 and o.is_contiguous()
        torch.testing.assert_close(o.float().cpu(), r.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("n", [64, 8960, 14336])  # a tiny model, the 1.5B and the 8B shapes
@pytest.mark.parametrize("form", ["plain", "fp8-product", "fp8-product-bias"])
@pytest.mark.parametrize("quant", [None, "fp8", "int8"])
def test_triton_silu_and_mul_matches_the_reference(n, form, quant):
    from inferd.layers.fused import FP8, silu_and_mul
    from inferd.layers.triton_fused import silu_and_mul_triton

    torch.manual_seed(0)
    rows = 33
    x = torch.randn(rows, 2 * n, device="cuda").bfloat16()
    x_scale = w_scale = bias = None
    if form != "plain":
        x = x * 100
        x_scale = torch.rand(rows, 1, device="cuda") + 0.5
        w_scale = torch.rand(1, 2 * n, device="cuda") / 100 + 0.005
        bias = torch.randn(2 * n, device="cuda").bfloat16() if form.endswith("bias") else None
    args = (x, x_scale, w_scale, bias, quant)
    ref = silu_and_mul(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    out = silu_and_mul_triton(*args)
    if not quant:
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float().cpu(), ref.float(), atol=1e-5, rtol=1.6e-2)  # a bf16 step or less
        return
    (q, scale), (ref_q, ref_scale) = out, ref
    assert q.dtype == (FP8 if quant == "fp8" else torch.int8) and q.shape == (rows, n) and scale.shape == (rows, 1)
    q, scale = q.cpu(), scale.cpu()
    torch.testing.assert_close(scale, ref_scale, rtol=1.6e-2, atol=0)  # the row maxima a bf16 step apart at most
    if quant == "int8":
        # Dequantized within a step and a half of the two scales (a bf16 step in the input, a
        # division within 2 ulp at a .5 tie); a row whose maximum came out the same: one code.
        got, want = q.float() * scale, ref_q.float() * ref_scale
        assert ((got - want).abs() <= 1.5 * torch.maximum(scale, ref_scale) + 0.02 * want.abs()).all()
        same = (scale == ref_scale).view(-1)
        assert (q[same].int() - ref_q[same].int()).abs().max() <= 1
        return
    # Where a row's maximum came out the same, its elements round to fp8 alike, bar the odd one
    # whose bf16 value was one step apart (a row whose maximum moved rounds all its elements anew;
    # on the H200 about half the rows' maxima differ by a bf16 step).
    same = (scale == ref_scale).view(-1)
    if same.any():
        differ = (q[same].view(torch.uint8) != ref_q[same].view(torch.uint8)).float().mean().item()
        assert differ < 0.01, differ
    # Dequantized, the two lie one fp8 step apart at most: an eighth of the value, or for fp8
    # subnormals (below 2**-6 of the row's scale) one subnormal step, 2**-9 of the scale.
    got, want = q.float() * scale, ref_q.float() * ref_scale
    bound = 0.13 * want.abs() + 2**-9 * torch.maximum(scale, ref_scale)
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_prefill_over_a_cached_context_in_one_varlen_call_equals_the_reference_loop(cache_dtype):
    """Chunks continuing a cached context (a prefix hit of 37 tokens, a chunk 2 of a long prompt,
    a fresh prompt in the same batch): one gather and one FlashAttention call give what the
    per-sequence reference gives, queries aligned to the end of their contexts."""
    from inferd.layers.attention import ContextGroup, prefill_attention_paged_varlen, prefill_attention_reference, store_kv
    from inferd.layers.context import AttentionContext

    g = torch.Generator(device="cuda").manual_seed(3)
    heads, kv_heads, head_dim, block = 12, 2, 128, 16
    query_lens, context_lens = [5, 64, 20], [42, 200, 20]
    num_blocks = 64
    tables = torch.randperm(num_blocks - 1, device="cuda", generator=g)[:39].view(3, 13).int()
    k_cache = torch.zeros(num_blocks, block, kv_heads, head_dim, device="cuda", dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    # Every context token's K/V in the cache (the chunk's own were stored by the layer already).
    slots = [
        tables[i, torch.arange(c, device="cuda") // block].long() * block + torch.arange(c, device="cuda") % block
        for i, c in enumerate(context_lens)
    ]
    total = sum(context_lens)
    k_all = torch.randn(total, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    v_all = torch.randn(total, kv_heads, head_dim, device="cuda", generator=g).bfloat16()
    store_kv(k_all, v_all, k_cache, v_cache, torch.cat(slots))
    q = torch.randn(sum(query_lens), heads, head_dim, device="cuda", generator=g).bfloat16()
    # The chunk's own K/V, as the layer hands them to the reference (the last query_len of each context).
    offsets = [0, *torch.tensor(context_lens).cumsum(0).tolist()]
    k_new = torch.cat([k_all[offsets[i + 1] - n : offsets[i + 1]] for i, n in enumerate(query_lens)])
    v_new = torch.cat([v_all[offsets[i + 1] - n : offsets[i + 1]] for i, n in enumerate(query_lens)])
    if cache_dtype != torch.bfloat16:  # the reference attends to the chunk as the cache holds it
        k_new, v_new = k_new.to(cache_dtype).bfloat16(), v_new.to(cache_dtype).bfloat16()
    q_offsets = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    ctx = AttentionContext(is_prefill=True, query_lens=query_lens, context_lens_list=context_lens, block_tables=tables)
    scale = head_dim**-0.5
    want = prefill_attention_reference(q, k_new, v_new, k_cache, v_cache, ctx, scale)
    for groups in ([(0, 3)], [(0, 1), (1, 3)]):  # one call, and in two groups (a gather budget)
        ctx.context_groups = []
        for a, b in groups:
            q_cu = torch.tensor([x - q_offsets[a] for x in q_offsets[a : b + 1]], device="cuda", dtype=torch.int32)
            k_cu = torch.tensor([x - offsets[a] for x in offsets[a : b + 1]], device="cuda", dtype=torch.int32)
            group = ContextGroup(
                q_offsets[a], q_offsets[b], torch.cat(slots[a:b]), q_cu, k_cu, max(query_lens[a:b]), max(context_lens[a:b])
            )
            ctx.context_groups.append(group)
        got = prefill_attention_paged_varlen(q, k_cache, v_cache, ctx, scale)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_prefix_cache_hits_give_the_tokens_of_a_cold_start(llama_dir):
    """A shared prefix computed once, then hit by later prompts (prefill over a cached context,
    the varlen path): greedy tokens equal those of an engine without the prefix cache."""
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prefix = list(range(3, 70))
    prompts = [prefix + [100 + i, 7, 9] for i in range(6)]
    small = dict(device="cuda", max_model_len=256, max_num_seqs=8, num_kv_blocks=256)
    cached = LLM(str(llama_dir), **small)
    cached.generate(prompts[:1], sp)  # the prefix is in the cache now
    hits = [o.token_ids for o in cached.generate(prompts[1:], sp)]
    cold = LLM(str(llama_dir), **small, enable_prefix_caching=False)
    assert hits == [o.token_ids for o in cold.generate(prompts[1:], sp)]
