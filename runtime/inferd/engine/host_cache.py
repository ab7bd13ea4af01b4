"""A second tier for the prefix cache, in pinned host memory.

A full KV block that the GPU prefix cache is about to forget (the least recently used free block,
taken for new tokens) is copied to a host pool under its chain hash instead; a prompt whose
prefix misses the GPU cache but hits this pool gets those blocks copied back and skips their
prefill. The hash chain starts at the tenant's salt (block_manager.tenant_salt), so a hit is
only ever for the same tenant, as on the GPU.

A block is copied as whatever the attention layers keep per block: the runner's one cache tensor
is [tensors, layers, blocks, block_size, *entry] (K and V, or MLA's latent; any dtype, fp8
included), and a pool slot holds [tensors, layers, block_size, *entry].

Ordering on CUDA: every copy runs on one side stream that first waits for everything already
queued on the compute stream (a step still in flight may write the very block being saved: the
engine applies stop rules one step late, so a finished sequence's last block can be freed while
its final token is being written), and the compute stream then waits for the copy before the
next step is queued. One stream for both directions keeps a slot's save ahead of any later
restore from it, and the host never blocks. Pinned memory lets the copies run asynchronously
(pageable memory would stage through a bounce buffer and wait for the device).

The pool is off by default (`host_kv_cache_gb: 0`): pinning tens of GB takes seconds at start-up
and takes the memory from the page cache and everything else on the host, which the operator has
to budget for; with the default the engine behaves exactly as before.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict

import torch

log = logging.getLogger("inferd.host_cache")


class HostCache:
    """LRU map from a block's chain hash to a slot of the pinned pool."""

    def __init__(self, kv_cache: torch.Tensor, num_slots: int):
        if num_slots < 1:
            raise ValueError("a host KV cache needs room for at least one block: raise host_kv_cache_gb")
        # Weakly: closing the engine frees the runner's KV cache while the engine is still referenced
        # (ModelRunner.close), and this tier must not keep it alive.
        self._kv_cache = weakref.ref(kv_cache)
        self.device = kv_cache.device
        self.is_cuda = kv_cache.is_cuda
        tensors, layers, _, *block_shape = kv_cache.shape
        self.pool = torch.empty((num_slots, tensors, layers, *block_shape), dtype=kv_cache.dtype)
        if self.is_cuda:
            _pin(self.pool)
            weakref.finalize(self, _unpin, self.pool, kv_cache.device)
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, least recently used first
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.stream = torch.cuda.Stream(kv_cache.device) if self.is_cuda else None
        self.hits = 0  # blocks restored to the GPU since start-up
        self.saved = 0  # blocks copied to the host since start-up

    @property
    def num_slots(self) -> int:
        return self.pool.shape[0]

    @property
    def num_blocks(self) -> int:
        return len(self.slots)

    @property
    def block_bytes(self) -> int:
        return self.pool[0].numel() * self.pool.element_size()

    @property
    def kv_cache(self) -> torch.Tensor:
        kv_cache = self._kv_cache()
        if kv_cache is None:
            raise RuntimeError("the engine's KV cache was freed (engine closed): the host KV cache cannot copy")
        return kv_cache

    def lookup(self, block_hash: bytes) -> bool:
        """Whether the pool holds `block_hash`; a hit becomes the most recently used entry."""
        if block_hash not in self.slots:
            return False
        self.slots.move_to_end(block_hash)
        return True

    @torch.inference_mode()
    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.stream is None:
            dst.copy_(src)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        compute.wait_stream(self.stream)

    def save(self, block_hash: bytes, block_id: int) -> None:
        """Copy GPU block `block_id` into the pool under `block_hash` (the oldest entry makes room)."""
        if block_hash in self.slots:
            self.slots.move_to_end(block_hash)
            return  # the same tokens under the same chain: the same K/V
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            _, slot = self.slots.popitem(last=False)
        self._copy(self.pool[slot], self.kv_cache[:, :, block_id])
        self.slots[block_hash] = slot
        self.saved += 1

    def restore(self, block_hash: bytes, block_id: int) -> bool:
        """Copy the pool's block for `block_hash` into GPU block `block_id`; False on a miss."""
        slot = self.slots.get(block_hash)
        if slot is None:
            return False
        self.slots.move_to_end(block_hash)
        self._copy(self.kv_cache[:, :, block_id], self.pool[slot])
        self.hits += 1
        return True

    def clear(self) -> None:
        """Forget every block (the weights changed). Copies still queued finish into slots that
        are free now; stream order puts them before any later use of those slots."""
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        self.slots.clear()


def _pin(t: torch.Tensor) -> None:
    """Page-lock `t` in place. Not `pin_memory=True`: torch's pinned allocator rounds each
    allocation up to a power of two, so a 40 GB pool would pin 64 GiB."""
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(
            f"could not pin {t.numel() * t.element_size() / 1e9:.1f} GB of host memory for the host KV cache "
            f"(CUDA error {int(err)}): lower host_kv_cache_gb or raise the memlock limit (LimitMEMLOCK)"
        )


def _unpin(pool: torch.Tensor, device: torch.device) -> None:
    """Unpin before the memory goes back to the allocator, once no copy can still be using it."""
    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(pool.data_ptr())


def host_cache_for(config, runner) -> HostCache | None:
    """The host tier `config.host_kv_cache_gb` asks for, over the runner's KV cache (None: off)."""
    if not config.host_kv_cache_gb:
        return None
    kv_cache = runner.kv_cache
    block_bytes = kv_cache[:, :, 0].numel() * kv_cache.element_size()
    num_slots = int(config.host_kv_cache_gb * 1e9 // block_bytes)
    cache = HostCache(kv_cache, num_slots)
    log.info(
        "host KV cache: %d blocks of %d tokens (%.2f GB pinned), %.1fx the GPU's %d blocks",
        num_slots,
        config.block_size,
        num_slots * block_bytes / 1e9,
        num_slots / max(runner.num_blocks, 1),
        runner.num_blocks,
    )
    return cache


def host_cache_stats(cache: HostCache | None) -> dict[str, int]:
    """The host tier's EngineStats fields (zeros without one)."""
    if cache is None:
        return {}
    return {
        "host_cache_hits": cache.hits,
        "host_cache_blocks": cache.num_blocks,
        "host_cache_capacity_blocks": cache.num_slots,
        "host_cache_bytes": cache.num_blocks * cache.block_bytes,
    }
