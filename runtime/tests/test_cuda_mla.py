"""The wide latent MLA decode kernel (layers/mla_decode.py, 64 heads a program) on the GPU in bf16,
against mla_decode_reference: every launch bench_mla.py sweeps, the table's launches through the
dispatch, split-K, and a CUDA graph replayed at new context lengths. Skipped without CUDA; does not
import the server.

    PYTHONPATH=$PWD/runtime python3 -m pytest -q runtime/tests/test_cuda_mla.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from inferd.layers import mla_decode as mla

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _case(batch, heads, block_size=16, lens=None, seed=0):
    """Ragged contexts (one token; a page boundary; several 64-token tiles), pages scattered."""
    lens = lens or ([333, 1, 17, 64, 200, 336, 65] * 10)[:batch]
    width = -(-max(lens) // block_size)
    g = torch.Generator(device="cuda").manual_seed(seed + batch * 1000 + heads)
    q_latent = torch.randn(batch, heads, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    q_rope = torch.randn(batch, heads, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cache = torch.randn(batch * width + 3, block_size, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(batch * width + 3, device="cuda", dtype=torch.int32, generator=g)[: batch * width]
    return q_latent, q_rope, cache, tables.view(batch, width), torch.tensor(lens, device="cuda", dtype=torch.int32), 192**-0.5


def _close(out, args):
    torch.testing.assert_close(out.float(), mla.mla_decode_reference(*args).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads", [64, 128, 96])  # one block; V3's two; a masked half block
@pytest.mark.parametrize("batch", [1, 7, 64])  # split-K for small batches, one pass for large ones
def test_mla_decode_wide_through_the_dispatch_matches_reference(heads, batch):
    args = _case(batch, heads)
    _close(mla.mla_decode(*args), args)


def test_every_swept_wide_launch_matches_reference():
    """bench_mla.py's candidates, each with a forced split-K and without: any of them may win the
    table, so each must be right (and fit the GPU's shared memory)."""
    from bench_mla import WIDE_CANDIDATES

    args = _case(5, 128)
    for config in WIDE_CANDIDATES + list(mla.WIDE_CONFIGS.values()):
        for splits in (1, 3):
            _close(mla.mla_decode_wide(*args, config=config, splits=splits), args)


def test_mla_decode_wide_in_a_graph_follows_new_context_lengths():
    """A graph captured at one set of context lengths replays correctly after the lengths and the
    block tables change in place: the wide launch (grid, splits) depends on shapes only."""
    q_latent, q_rope, cache, tables, lens, scale = _case(4, 128)
    mla.mla_decode(q_latent, q_rope, cache, tables, lens, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla.mla_decode(q_latent, q_rope, cache, tables, lens, scale)
    lens.copy_(torch.tensor([5, 300, 2, 129], dtype=torch.int32))
    tables.copy_(tables.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, (q_latent, q_rope, cache, tables, lens, scale))


def test_mla_decode_wide_at_a_long_context_and_a_large_page():
    """16k tokens in 64-token pages (FlashMLA's page size): many tiles a split, pages = tiles."""
    args = _case(2, 128, block_size=64, lens=[16384, 9001])
    _close(mla.mla_decode(*args), args)
