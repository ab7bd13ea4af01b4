"""The Triton paged decode kernel's split logic against the torch reference on the CPU, through
Triton's interpreter (float32; test_cuda.py runs it on the GPU in bf16 and fp8):

    PYTHONPATH=$PWD/runtime:/work/triton-pkgs TRITON_INTERPRET=1 pytest -q runtime/tests/test_paged_decode.py

It checks the split logic: which tokens each split takes, the empty splits past the context, the
one-tile contexts taken in one split (no merge), the merge kernel's weights and a padded row."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import _interpreter_scalars, needs_interpreter  # noqa: F401  (autouse fixture)

from inferd.layers.attention import decode_attention_reference

pytestmark = needs_interpreter


@pytest.mark.parametrize("splits", [None, 1, 3, 8, 16])
@pytest.mark.parametrize("lens", [[1], [64], [65], [300], [333], [200, 1, 0, 17, 130]])
def test_split_attention_equals_the_reference(lens, splits):
    """Contexts of one tile (the other splits empty), of several (300 tokens in 3 splits: shares
    of 2, 2 and 1 tiles) and a padded row (context 0) in one batch, in one split or several (a
    context of one tile: one split, which writes the output itself, the merge doing nothing)."""
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
