"""KVSpace: one model's KV cache as blocks packed into the pages of one virtual range.

A block holds `block_size` tokens of K and V for all layers, contiguous (Prism's layout), so allocating
a block touches one region. Blocks need not divide pages: a block may straddle two pages, and it is
usable only while every page it overlaps is mapped. A page is unmapped once no allocated block overlaps
it, except that a few empty pages stay mapped (hysteresis) so that a burst of alloc/free does not pay a
map and an unmap per block.

Allocation takes the lowest free block ids, which keeps live blocks packed at the start of the range and
lets high pages empty out. When the pool has no page left, allocation falls back to free blocks on pages
that are already mapped, and returns None (mapping nothing) if there are not enough.
"""

from __future__ import annotations

import heapq

import torch

from memory.pool import MemoryKind, PagePool


class KVSpace:
    def __init__(self, pool: PagePool, owner: str, block_bytes: int, max_blocks: int, idle_pages: int = 2):
        if block_bytes <= 0 or max_blocks <= 0:
            raise ValueError("block_bytes and max_blocks must be positive")
        self.pool = pool
        self.owner = owner
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self.idle_pages = idle_pages
        self.vrange = pool.reserve_range(owner, MemoryKind.KV, block_bytes * max_blocks)
        self._free_heap = list(range(max_blocks))  # already a heap
        self._allocated = bytearray(max_blocks)
        self._page_refs = [0] * self.vrange.num_pages
        self._idle: set[int] = set()  # mapped pages that no allocated block overlaps

    # --- views ----------------------------------------------------------------------------------

    def tensor(self, dtype: torch.dtype, block_shape: tuple[int, ...]) -> torch.Tensor:
        """The whole space as [max_blocks, *block_shape] of `dtype` (no copy)."""
        raw = self.pool.tensor(self.vrange)[: self.max_blocks * self.block_bytes]
        return raw.view(dtype).view(self.max_blocks, *block_shape)

    # --- counts ---------------------------------------------------------------------------------

    @property
    def num_used_blocks(self) -> int:
        return self.max_blocks - len(self._free_heap)

    @property
    def num_free_blocks(self) -> int:
        """Free block ids (whether or not the pool could back them now)."""
        return len(self._free_heap)

    @property
    def num_mapped_pages(self) -> int:
        return self.vrange.num_mapped

    def num_blocks_backable(self) -> int:
        """Blocks allocatable right now: free blocks on mapped pages plus what free pool pages would add."""
        per_page = max(1, self.pool.page_bytes // self.block_bytes)
        on_mapped = sum(1 for b in self._free_heap if self._block_pages_mapped(b))
        return min(self.num_free_blocks, on_mapped + self.pool.num_free_pages * per_page)

    # --- allocation -----------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Allocate `num_blocks` blocks backed by mapped pages, or return None and change nothing."""
        if num_blocks <= 0:
            return []
        if num_blocks > len(self._free_heap):
            return None
        block_ids = [heapq.heappop(self._free_heap) for _ in range(num_blocks)]
        to_map = sorted({p for b in block_ids for p in self._pages(b) if not self.vrange.is_mapped(p)})
        if not self.pool.map_pages(self.vrange, to_map):
            for b in block_ids:
                heapq.heappush(self._free_heap, b)
            block_ids = self._take_blocks_on_mapped_pages(num_blocks)
            if block_ids is None:
                return None
        for b in block_ids:
            self._allocated[b] = 1
            for p in self._pages(b):
                self._page_refs[p] += 1
                self._idle.discard(p)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Free blocks; pages left empty are unmapped beyond the hysteresis allowance."""
        for b in block_ids:
            if not 0 <= b < self.max_blocks or not self._allocated[b]:
                raise ValueError(f"block {b} of {self.owner} is not allocated")
        for b in block_ids:
            self._allocated[b] = 0
            heapq.heappush(self._free_heap, b)
            for p in self._pages(b):
                self._page_refs[p] -= 1
                if self._page_refs[p] == 0:
                    self._idle.add(p)
        self.trim(self.idle_pages)

    def trim(self, keep_idle_pages: int = 0) -> int:
        """Unmap empty pages until at most `keep_idle_pages` stay mapped; return how many were unmapped."""
        excess = len(self._idle) - keep_idle_pages
        if excess <= 0:
            return 0
        victims = sorted(self._idle, reverse=True)[:excess]
        self.pool.unmap_pages(self.vrange, victims)
        self._idle.difference_update(victims)
        return len(victims)

    def close(self) -> None:
        """Release the whole space (every block must be freed by then, or is dropped with it)."""
        self._idle.clear()
        self.pool.release_range(self.vrange)

    # --- internals ------------------------------------------------------------------------------

    def _pages(self, block_id: int) -> range:
        start = block_id * self.block_bytes
        return range(start // self.pool.page_bytes, (start + self.block_bytes - 1) // self.pool.page_bytes + 1)

    def _block_pages_mapped(self, block_id: int) -> bool:
        return all(self.vrange.is_mapped(p) for p in self._pages(block_id))

    def _take_blocks_on_mapped_pages(self, num_blocks: int) -> list[int] | None:
        ready = sorted(b for b in self._free_heap if self._block_pages_mapped(b))
        if len(ready) < num_blocks:
            return None
        taken = set(ready[:num_blocks])
        self._free_heap = [b for b in self._free_heap if b not in taken]
        heapq.heapify(self._free_heap)
        return ready[:num_blocks]
