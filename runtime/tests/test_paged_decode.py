"""The Triton paged decode kernel's split logic against the torch reference on the CPU, through
Triton's interpreter (float32; test_cuda.py runs it on the GPU in bf16 and fp8):

    PYTHONPATH=$PWD/runtime:/work/triton-pkgs TRITON_INTERPRET=1 pytest -q runtime/tests/test_paged_decode.py

The interpreter runs a launch's programs one after another, so the last split to arrive is always
the highest: it checks which splits work, the merge in the kernel and the counters it leaves
behind, not the race between programs (the GPU tests have that)."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import _interpreter_scalars, needs_interpreter  # noqa: F401  (autouse fixture)

from inferd.layers.attention import decode_attention_reference

pytestmark = needs_interpreter


@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("lens", [[1], [64], [65], [333], [200, 1, 0, 17, 130]])
def test_splits_by_context_merge_in_the_kernel_and_leave_the_counters_zero(lens, splits):
    """Contexts of one tile (one split writes the output), of several (the splits past the last
    tile idle, the last to arrive merges) and a padded row (context 0) in one batch."""
    from inferd.layers.paged_decode import paged_decode_attention, split_counters

    g = torch.Generator().manual_seed(len(lens))
    heads, kv_heads, dim, block, width = 12, 2, 64, 16, 21
    k_cache = torch.randn(width * len(lens), block, kv_heads, dim, generator=g)
    v_cache = torch.randn(width * len(lens), block, kv_heads, dim, generator=g)
    q = torch.randn(len(lens), heads, dim, generator=g)
    tables = torch.randperm(width * len(lens), generator=g).int().view(len(lens), width)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    counters = split_counters(kv_heads, "cpu", 2 * kv_heads * len(lens))
    for _ in range(2):  # the second call reuses the counters the first left
        out = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, dim**-0.5, splits=splits, counters=counters)
        ref = decode_attention_reference(q, k_cache, v_cache, tables.long(), context_lens, dim**-0.5)
        for row, n in enumerate(lens):
            if n:  # a padded row's output is not read
                torch.testing.assert_close(out[row], ref[row], atol=1e-4, rtol=1e-4)
        assert not counters.any()


def test_too_few_counters_is_an_error_naming_the_need():
    from inferd.layers.paged_decode import paged_decode_attention, split_counters

    q = torch.randn(3, 4, 16)
    cache = torch.randn(4, 16, 2, 16)
    with pytest.raises(ValueError, match="6 int32 zeros needed, got 4"):
        paged_decode_attention(
            q,
            cache,
            cache,
            torch.zeros(3, 4, dtype=torch.int32),
            torch.ones(3, dtype=torch.int32),
            0.25,
            splits=2,
            counters=split_counters(2, "cpu", 4),
        )
