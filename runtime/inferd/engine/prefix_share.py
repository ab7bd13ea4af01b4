"""Requests that arrive together with a shared prefix compute it once.

Measured on the H200 (BENCHMARKS.md, "Performance II"): 256 requests sharing a 1,500-token system
prompt, all arriving at once, hit the prefix cache 90.8 % of the time overall, yet their prefill
steps took 8.0 s against a 0.70 s bound: every request admitted in the same step as the first one,
or while the first one's prefix was still being computed over several chunks, computed the prefix
itself, because a block enters the prefix cache only once the step computing it is launched.

So a waiting sequence whose first block missing from the cache is one that a running sequence is
computing right now waits (the scheduler admits others behind it meanwhile); once that block is
committed it is a cache hit. The wait is recomputed every step from the running sequences, so it
ends when the block is committed or when the sequence computing it stops (preempted, aborted,
finished). Hashes chain from the tenant's salt, so a tenant never waits on another's prefix.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from inferd.engine.block_manager import BlockManager
from inferd.engine.sequence import Sequence


class PrefixWaits:
    def __init__(self, block_manager: BlockManager):
        self.block_manager = block_manager
        # A prompt's hashes never change; computed once per sequence, dropped with it.
        self._hashes: weakref.WeakKeyDictionary[Sequence, list[bytes]] = weakref.WeakKeyDictionary()

    def _num_prompt_blocks(self, seq: Sequence) -> int:
        # As allocate_prompt: never the block holding the last prompt token.
        return (seq.num_prompt_tokens - 1) // self.block_manager.block_size

    def prompt_hashes(self, seq: Sequence) -> list[bytes]:
        """Chain hashes of the sequence's full prompt blocks (BlockManager.prompt_hashes)."""
        hashes = self._hashes.get(seq)
        if hashes is None:
            hashes = self._hashes[seq] = list(self.block_manager.prompt_hashes(seq, seq.num_prompt_tokens))
        return hashes

    def uncommitted(self, seqs: Iterable[Sequence]) -> set[bytes]:
        """Hashes of the prompt blocks these (running) sequences hold but have not committed yet."""
        if not self.block_manager.enable_prefix_caching:
            return set()
        return {
            h
            for seq in seqs
            if seq.num_hashed_blocks < self._num_prompt_blocks(seq)
            for h in self.prompt_hashes(seq)[seq.num_hashed_blocks :]
        }

    def must_wait(self, seq: Sequence, computing: set[bytes]) -> bool:
        """Whether the sequence's first uncached prompt block is in `computing` (see uncommitted)."""
        if not computing or seq.params.prompt_logprobs:
            return False  # a prompt scored token by token takes nothing from the cache
        bm = self.block_manager
        for h in self.prompt_hashes(seq):
            if not bm.is_cached(h):
                return h in computing
        return False
