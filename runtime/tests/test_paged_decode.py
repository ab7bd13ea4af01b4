"""The Triton paged decode kernel's split logic against the torch reference on the CPU, through
Triton's interpreter (float32; test_cuda.py runs it on the GPU in bf16 and fp8):

    PYTHONPATH=$PWD/runtime:/work/triton-pkgs TRITON_INTERPRET=1 pytest -q runtime/tests/test_paged_decode.py

It checks the split logic: which tokens each split takes, the empty splits past the context, the
merge kernel's weights and a padded row."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import _interpreter_scalars, needs_interpreter  # noqa: F401  (autouse fixture)

from inferd.layers.attention import decode_attention_reference

pytestmark = needs_interpreter


@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("lens", [[1], [64], [65], [333], [200, 1, 0, 17, 130]])
def test_split_attention_equals_the_reference(lens, splits):
    """Contexts of one tile (the other splits empty), of several and a padded row (context 0)
    in one batch, in one split or several."""
    from inferd.layers.paged_decode import paged_decode_attention

    g = torch.Generator().manual_seed(len(lens))
    heads, kv_heads, dim, block, width = 12, 2, 64, 16, 21
    k_cache = torch.randn(width * len(lens), block, kv_heads, dim, generator=g)
    v_cache = torch.randn(width * len(lens), block, kv_heads, dim, generator=g)
    q = torch.randn(len(lens), heads, dim, generator=g)
    tables = torch.randperm(width * len(lens), generator=g).int().view(len(lens), width)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, dim**-0.5, splits=splits)
    ref = decode_attention_reference(q, k_cache, v_cache, tables.long(), context_lens, dim**-0.5)
    for row, n in enumerate(lens):
        if n:  # a padded row's output is not read
            torch.testing.assert_close(out[row], ref[row], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("context", [1, 16, 64, 65, 200, 333])
@pytest.mark.parametrize("splits", [1, 8])
@pytest.mark.parametrize("early", [False, True])
def test_the_new_token_stored_by_the_attention_kernel_equals_the_store_kernel_before_it(early, context, splits, cache_dtype):
    """A batch-1 step's new K/V stored by the split that holds it (new_kv) against store_kv_triton
    then attention: the same cache bytes and the same output, with the slot holding NaN before
    (a split that read it before the store, as the early loads read the first tile, would carry
    the NaN into the output)."""
    from inferd.layers.paged_decode import paged_decode_attention, store_kv_triton

    g = torch.Generator().manual_seed(context)
    heads, kv_heads, dim, block, width = 4, 2, 32, 16, 21
    caches = [torch.randn(width, block, kv_heads, dim, generator=g).to(cache_dtype) for _ in range(2)]
    q = torch.randn(1, heads, dim, generator=g)
    k, v = torch.randn(2, 1, kv_heads, dim, generator=g) * 3
    table = torch.randperm(width, generator=g).int().view(1, width)
    lens = torch.tensor([context], dtype=torch.int32)
    slot = (table[0, (context - 1) // block].long() * block + (context - 1) % block).view(1)
    for c in caches:
        c.view(-1, kv_heads, dim)[slot] = float("nan")
    k_sep, v_sep = (c.clone() for c in caches)
    store_kv_triton(k, v, k_sep, v_sep, slot)
    separate = paged_decode_attention(q, k_sep, v_sep, table, lens, dim**-0.5, splits=splits, early=False)
    k_fused, v_fused = (c.clone() for c in caches)
    fused = paged_decode_attention(q, k_fused, v_fused, table, lens, dim**-0.5, splits=splits, new_kv=(k, v, slot), early=early)
    assert not fused.isnan().any()
    assert torch.equal(fused, separate)
    assert torch.equal(k_fused.view(torch.uint8), k_sep.view(torch.uint8))
    assert torch.equal(v_fused.view(torch.uint8), v_sep.view(torch.uint8))
