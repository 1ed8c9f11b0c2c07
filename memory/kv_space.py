"""KVSpace: one model's KV cache as blocks packed into the pages of one virtual range.

A block holds `block_size` tokens of K and V for all layers, contiguous (Prism's layout), so allocating
a block touches one region. Blocks need not divide pages: a block may straddle two pages, and it is
usable only while every page it overlaps is mapped. A page is unmapped once no allocated block overlaps
it, except that a few empty pages stay mapped (hysteresis) so that a burst of alloc/free does not pay a
map and an unmap per block (~40 us a page on an H100). Idle pages never starve another model: the space
registers with the pool, which takes them back when another client's map runs short.

Every free block is either *ready* (all its pages mapped) or *unbacked*. Allocation takes ready blocks
first, lowest ids first (filling pages that are already paid for, as kvcached does), then the lowest
unbacked ids, mapping their pages in one pool call. If the pool cannot back them, allocation returns None
and changes nothing. Each state keeps a min-heap with lazy deletion, so allocation costs
O(blocks taken × log) however large the space is (the scheduler calls it every step, and under memory
pressure it fails every step).

A KVSpace belongs to one thread (the worker loop); the pool under it is thread-safe.
"""

from __future__ import annotations

import heapq

import torch

from memory.pool import MemoryKind, PagePool

_ALLOCATED, _READY, _UNBACKED = 0, 1, 2


class _StateHeap:
    """Min-heap of the block ids in one state, with lazy deletion.

    Entries whose block has since changed state are skipped when popped and dropped when the heap is
    compacted; a block may sit in the heap twice, so the taker changes its state at once.
    """

    def __init__(self, states: bytearray, state: int, block_ids: list[int]):
        self._states = states
        self._state = state
        self._heap = sorted(block_ids)

    def push(self, block_id: int) -> None:
        heapq.heappush(self._heap, block_id)

    def take(self, num_blocks: int, new_state: int) -> list[int]:
        """Pop the `num_blocks` lowest ids still in this state (the caller knows that many exist)."""
        taken: list[int] = []
        while len(taken) < num_blocks:
            block_id = heapq.heappop(self._heap)
            if self._states[block_id] == self._state:
                self._states[block_id] = new_state
                taken.append(block_id)
        return taken

    def compact(self, num_live: int) -> None:
        """Drop stale entries once they outnumber live ones, bounding the heap at twice its live size."""
        if len(self._heap) > 2 * num_live + 64:
            self._heap = sorted({b for b in self._heap if self._states[b] == self._state})


class KVSpace:
    """One model's KV blocks in one virtual range of `pool`.

    `idle_pages` is the hysteresis: empty pages kept mapped. It costs other models nothing (the pool
    reclaims idle pages when they run short) and saves maps: with one-page blocks (Llama-3.1-8B, 16 tokens
    bf16) and a random arrival/completion mix, 2 idle pages leave 85% of allocations mapping pages (p50
    170-190 us on the H100) and 16 leave 23% (p50 8-9 us); see benchmarks/pool.py.

    `trim_on_free=False` leaves every page that `free` empties mapped and idle until the owner calls
    `trim(idle_pages)` (or the pool reclaims it for another model). On a GPU an unmap first waits for
    the device, so unmapping inside `free`, which the scheduler calls as a step's sequences finish while
    the next step is already queued, made the host wait for that step; a worker trims between steps.
    """

    def __init__(self, pool: PagePool, owner: str, block_bytes: int, max_blocks: int, idle_pages: int = 2,
                 trim_on_free: bool = True):
        if block_bytes <= 0 or max_blocks <= 0 or idle_pages < 0:
            raise ValueError("block_bytes and max_blocks must be positive and idle_pages non-negative")
        self.pool = pool
        self.owner = owner
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self.idle_pages = idle_pages
        self.trim_on_free = trim_on_free
        self.vrange = pool.reserve_range(owner, MemoryKind.KV, block_bytes * max_blocks)
        self._states = bytearray([_UNBACKED]) * max_blocks
        self._ready = _StateHeap(self._states, _READY, [])
        self._unbacked = _StateHeap(self._states, _UNBACKED, list(range(max_blocks)))
        self._num_ready = 0
        self._num_unbacked = max_blocks
        self._page_refs = [0] * self.vrange.num_pages  # allocated blocks overlapping each page
        self._idle: set[int] = set()  # mapped pages that no allocated block overlaps
        self._closed = False
        pool.add_reclaimer(self.vrange, self)

    @classmethod
    def for_model(cls, pool: PagePool, owner: str, block_bytes: int, trim_on_free: bool = True) -> KVSpace:
        """A model's space as an engine makes it: address room for as many blocks as the whole pool could
        back (pages are mapped only on use), and a hysteresis of 16 idle pages for big blocks (half a page
        or more: else nearly every allocation would map a page) or 2 for small ones."""
        max_blocks = max(1, pool.budget_pages * pool.page_bytes // block_bytes)
        idle_pages = 16 if block_bytes >= pool.page_bytes // 2 else 2
        return cls(pool, owner, block_bytes, max_blocks, idle_pages=idle_pages, trim_on_free=trim_on_free)

    # --- views ----------------------------------------------------------------------------------

    def tensor(self, dtype: torch.dtype, block_shape: tuple[int, ...]) -> torch.Tensor:
        """The whole space as [max_blocks, *block_shape] of `dtype` (no copy); drop it before `close`."""
        self._check_open()
        raw = self.pool.tensor(self.vrange)[: self.max_blocks * self.block_bytes]
        return raw.view(dtype).view(self.max_blocks, *block_shape)

    # --- counts ---------------------------------------------------------------------------------

    @property
    def num_used_blocks(self) -> int:
        return self.max_blocks - self.num_free_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free block ids (whether or not the pool could back them now)."""
        return self._num_ready + self._num_unbacked

    @property
    def num_ready_blocks(self) -> int:
        """Free blocks whose pages are all mapped: allocatable without asking the pool."""
        return self._num_ready

    @property
    def num_mapped_pages(self) -> int:
        return self.vrange.num_mapped

    @property
    def num_idle_pages(self) -> int:
        """Mapped pages that no allocated block overlaps (kept for hysteresis, or awaiting `trim`)."""
        return len(self._idle)

    def num_blocks_backable(self) -> int:
        """Blocks allocatable right now, estimated: ready blocks plus what the pool's free pages would back.

        Exact when blocks divide pages; otherwise within a block or two per page boundary. Idle pages of
        other models, which `allocate` may reclaim, are not counted.
        """
        from_free_pages = self.pool.num_free_pages * self.pool.page_bytes // self.block_bytes
        return min(self.num_free_blocks, self._num_ready + from_free_pages)

    # --- allocation -----------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Allocate `num_blocks` blocks backed by mapped pages, or return None and change nothing."""
        self._check_open()
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > self.num_free_blocks:
            return None
        # Taken blocks are marked allocated at once (the heaps may hold duplicates); put back on failure.
        from_ready = self._ready.take(min(num_blocks, self._num_ready), _ALLOCATED)
        from_unbacked = self._unbacked.take(num_blocks - len(from_ready), _ALLOCATED)
        try:
            backed = not from_unbacked or self._map_pages_of(from_unbacked)
        except BaseException:
            self._put_back(from_ready, _READY, self._ready)
            self._put_back(from_unbacked, _UNBACKED, self._unbacked)
            raise
        if not backed:
            self._put_back(from_ready, _READY, self._ready)
            self._put_back(from_unbacked, _UNBACKED, self._unbacked)
            return None
        self._num_ready -= len(from_ready)
        self._num_unbacked -= len(from_unbacked)
        block_ids = from_ready + from_unbacked
        for b in block_ids:
            for p in self._pages(b):
                self._page_refs[p] += 1
                self._idle.discard(p)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Free blocks; pages left empty are unmapped beyond the hysteresis allowance (with `trim_on_free`)."""
        self._check_open()
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"duplicate block ids freed in {self.owner}")
        for b in block_ids:
            if not 0 <= b < self.max_blocks or self._states[b] != _ALLOCATED:
                raise ValueError(f"block {b} of {self.owner} is not allocated")
        for b in block_ids:
            self._states[b] = _READY
            self._ready.push(b)
            for p in self._pages(b):
                self._page_refs[p] -= 1
                if self._page_refs[p] == 0:
                    self._idle.add(p)
        self._num_ready += len(block_ids)
        if self.trim_on_free:
            self.trim(self.idle_pages)
        self._compact()

    def trim_idle(self, has_work: bool) -> int:
        """The heartbeat's trim: all empty pages of a model with no work (hysteresis is for bursts), those
        beyond the hysteresis of one with work; return how many were unmapped."""
        return self.trim(self.idle_pages if has_work else 0)

    def trim(self, keep_idle_pages: int = 0) -> int:
        """Unmap empty pages, highest first, until at most `keep_idle_pages` stay mapped; return how many.

        Call `trim(0)` after a budget shrink left the pool over budget (`set_budget` returns the overage).
        """
        self._check_open()
        excess = len(self._idle) - keep_idle_pages
        if excess <= 0:
            return 0
        victims = sorted(self._idle, reverse=True)[:excess]
        self.pool.unmap_pages(self.vrange, victims)
        self._idle.difference_update(victims)
        for p in victims:
            for b in self._blocks_on(p):
                assert self._states[b] != _ALLOCATED, f"unmapped page {p} under allocated block {b}"
                if self._states[b] == _READY:
                    self._states[b] = _UNBACKED
                    self._unbacked.push(b)
                    self._num_ready -= 1
                    self._num_unbacked += 1
        self._compact()
        return len(victims)

    def give_back_idle(self, num_pages: int) -> int:
        """Unmap up to `num_pages` idle pages (the pool asks when another client runs short)."""
        if self._closed:
            return 0
        return self.trim(max(0, len(self._idle) - num_pages))

    def close(self) -> None:
        """Release the whole space; blocks still allocated are dropped with it. Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        self._idle.clear()
        self.pool.release_range(self.vrange)

    def audit(self) -> None:
        """Assert this space's invariants against the pool's view of its range (tests and debugging)."""
        states = self._states
        assert states.count(_READY) == self._num_ready and states.count(_UNBACKED) == self._num_unbacked
        refs = [0] * self.vrange.num_pages
        for b in range(self.max_blocks):
            backed = self._block_pages_mapped(b)
            assert backed or states[b] == _UNBACKED, f"block {b} is usable but a page under it is unmapped"
            assert not backed or states[b] != _UNBACKED, f"block {b} is backed but marked unbacked"
            if states[b] == _ALLOCATED:
                for p in self._pages(b):
                    refs[p] += 1
        assert refs == self._page_refs, "page reference counts disagree with the allocated blocks"
        idle = {p for p in range(self.vrange.num_pages) if self.vrange.is_mapped(p) and refs[p] == 0}
        assert idle == self._idle, "idle pages disagree with the mapped pages"

    # --- internals ------------------------------------------------------------------------------

    def _map_pages_of(self, block_ids: list[int]) -> bool:
        """Map the unmapped pages under these blocks; on success, blocks that became ready are marked."""
        pages = sorted({p for b in block_ids for p in self._pages(b) if not self.vrange.is_mapped(p)})
        if not self.pool.map_pages(self.vrange, pages):
            return False
        for p in pages:
            for b in self._blocks_on(p):
                if self._states[b] == _UNBACKED and self._block_pages_mapped(b):
                    self._states[b] = _READY
                    self._ready.push(b)
                    self._num_ready += 1
                    self._num_unbacked -= 1
        self._compact()
        return True

    def _put_back(self, block_ids: list[int], state: int, heap: _StateHeap) -> None:
        for b in block_ids:
            self._states[b] = state
            heap.push(b)

    def _compact(self) -> None:
        self._ready.compact(self._num_ready)
        self._unbacked.compact(self._num_unbacked)

    def _pages(self, block_id: int) -> range:
        start = block_id * self.block_bytes
        return range(start // self.pool.page_bytes, (start + self.block_bytes - 1) // self.pool.page_bytes + 1)

    def _blocks_on(self, page_index: int) -> range:
        first = page_index * self.pool.page_bytes // self.block_bytes
        last = ((page_index + 1) * self.pool.page_bytes - 1) // self.block_bytes
        return range(first, min(last, self.max_blocks - 1) + 1)

    def _block_pages_mapped(self, block_id: int) -> bool:
        return all(self.vrange.is_mapped(p) for p in self._pages(block_id))

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"KV space of {self.owner} is closed")


class CappedKV:
    """A model's KV allocation held under a fixed number of blocks (the static baseline's partitioning)."""

    def __init__(self, kv: KVSpace, max_blocks: int):
        self.kv = kv
        self.max_blocks = max_blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        if self.kv.num_used_blocks + num_blocks > self.max_blocks:
            return None
        return self.kv.allocate(num_blocks)

    def free(self, block_ids: list[int]) -> None:
        self.kv.free(block_ids)
