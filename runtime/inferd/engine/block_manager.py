"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A full block is identified by a hash chained over every token before it, so two sequences that
share a prefix share its blocks, and a block freed by one request stays findable for the next
until it is reused (freed blocks go to the back of the free list: least recently used first).

The chain starts from the sequence's tenant (the API key): prefixes are shared within a tenant
only. Across tenants a cache hit is a timing signal: another tenant's cached 500-token prompt was
answered in 312 ms against 1,076 ms for an unseen one (issue 24), which tells a user what someone
else asked. vLLM's `cache_salt` does the same.

With a host tier (host_cache.py), a hashed block is copied to pinned host memory when it is
taken for new tokens, and a prompt whose prefix continues there gets those blocks copied back
instead of computing them.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator

import numpy as np

from inferd.engine.sequence import Sequence


def chain_hash(token_ids: list[int], prefix: bytes) -> bytes:
    h = hashlib.blake2b(prefix, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def tenant_salt(tenant: str) -> bytes:
    """Where a tenant's hash chains start: no two tenants' blocks can share a hash."""
    return hashlib.blake2b(tenant.encode(), digest_size=16, person=b"inferd-tenant").digest() if tenant else b""


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, host_cache=None):
        self.block_size = block_size
        self.host_cache = host_cache if enable_prefix_caching else None
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[bytes, int] = {}
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.prefix_queries = 0
        self.prefix_hits = 0  # in tokens

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def _take(self, block_id: int) -> Block:
        """Share a cached block: revive it from the free list if nobody holds it now."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_ids.remove(block_id)
        block.ref_count += 1
        return block

    def _allocate_fresh(self) -> Block:
        block_id = self.free_ids.popleft()
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
            if self.host_cache is not None:
                self.host_cache.save(block.hash, block_id)
        block.hash = None
        block.ref_count = 1
        return block

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add to the sequence's table so that num_tokens (total) fit."""
        return max(0, (num_tokens + self.block_size - 1) // self.block_size - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def prompt_hashes(self, seq: Sequence, num_tokens: int | None = None) -> Iterator[bytes]:
        """Chain hashes of the blocks a cache may supply to the sequence's first `num_tokens`
        (default all) tokens, in order: every full block but the one holding the last of them
        (whose logits must be computed)."""
        prefix = tenant_salt(seq.tenant)
        for i in range(((len(seq) if num_tokens is None else num_tokens) - 1) // self.block_size):
            prefix = chain_hash(seq.block(i), prefix)
            yield prefix

    def allocate_prompt(self, seq: Sequence) -> None:
        """First scheduling of a sequence: reuse cached prefix blocks (see prompt_hashes), reserve
        nothing else yet."""
        assert not seq.block_table
        seq.num_cached_tokens = 0
        # A prompt scored token by token (prompt logprobs) is computed in full: a cached block
        # has no logits.
        if self.enable_prefix_caching and not seq.params.prompt_logprobs:
            self.prefix_queries += len(seq)
            for h in self.prompt_hashes(seq):
                block_id = self.hash_to_block.get(h)
                if block_id is not None:
                    self._take(block_id)
                elif (block_id := self._restore(h)) is None:
                    break
                seq.block_table.append(block_id)
            seq.num_cached_tokens = len(seq.block_table) * self.block_size
            seq.num_hashed_blocks = len(seq.block_table)
            self.prefix_hits += seq.num_cached_tokens
        seq.num_computed_tokens = seq.num_cached_tokens

    def is_cached(self, block_hash: bytes) -> bool:
        """Whether allocate_prompt would take `block_hash` from the cache (GPU or host tier)."""
        return block_hash in self.hash_to_block or (self.host_cache is not None and self.host_cache.lookup(block_hash))

    def _restore(self, block_hash: bytes) -> int | None:
        """A GPU block holding the host tier's copy of `block_hash`, registered in the prefix
        cache; None when the host tier lacks it or no GPU block is free."""
        if self.host_cache is None or not self.free_ids or not self.host_cache.lookup(block_hash):
            return None
        block = self._allocate_fresh()  # may save its old block to the host, never evicting this one...
        if not self.host_cache.restore(block_hash, block.block_id):  # ...unless the pool has one slot
            block.ref_count = 0
            self.free_ids.appendleft(block.block_id)
            return None
        block.hash = block_hash
        self.hash_to_block[block_hash] = block.block_id
        return block.block_id

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for num_tokens (total) in the sequence's blocks."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._allocate_fresh().block_id)

    def mark_computed(self, seq: Sequence, num_tokens: int) -> None:
        """`num_tokens` more of the sequence's tokens have their K/V in the cache (a step that
        computes them is launched): count them and register the blocks they complete."""
        seq.num_computed_tokens += num_tokens
        self._commit_full_blocks(seq)

    def _commit_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that are now completely computed."""
        full = seq.num_computed_tokens // self.block_size
        start = seq.num_hashed_blocks
        if not self.enable_prefix_caching or full <= start:
            return
        prefix = self.blocks[seq.block_table[start - 1]].hash if start else tenant_salt(seq.tenant)
        for i in range(start, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = chain_hash(seq.block(i), prefix)
                self.hash_to_block.setdefault(block.hash, block.block_id)
            prefix = block.hash
        seq.num_hashed_blocks = max(start, full)

    def keep_verified(self, seq: Sequence, num_tokens: int) -> None:
        """A speculative step wrote K/V for drafts the target then checked: `num_tokens` more are
        verified (counted, and the blocks they complete registered: never a block holding a
        rejected draft), and the blocks past the sequence's tokens go back unhashed. K/V left in a
        kept block beyond the verified tokens is overwritten before anything attends to it."""
        self.mark_computed(seq, num_tokens)
        keep = (len(seq) + self.block_size - 1) // self.block_size
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.appendleft(block_id)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free_ids.appendleft(block_id)  # nothing worth keeping: reuse first
                else:
                    self.free_ids.append(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def forget_prefixes(self) -> None:
        """Drop every cached prefix (the weights changed: their K/V no longer matches). Held blocks
        keep their contents; only the hashes that would share them go."""
        for block in self.blocks:
            block.hash = None
        self.hash_to_block.clear()
        if self.host_cache is not None:
            self.host_cache.clear()
