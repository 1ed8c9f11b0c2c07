"""PagePool: the one owner of a device's physical memory for models.

Clients reserve virtual ranges (one per model and kind: KV or weights) and ask the pool to map physical
pages into them. The pool enforces a page budget that can shrink and grow at run time, keeps a reserve of
created-but-unmapped pages so that mapping on the hot path skips page creation, and knows at every moment
how many pages each model holds for weights and for KV. The unit of accounting, of the budget and of the
client API is the page (2 MiB on a GPU).

Chunks: physical memory is created in chunks (memory/chunks.py) because the driver's cost is per call:
one cuMemMap + cuMemSetAccess maps a whole 64 MiB chunk for ~1.3 µs a page against ~33 µs for a lone
2 MiB page. The driver maps only whole allocations, so every mapping is one whole chunk. `map_pages` on a
WEIGHTS range splits the pages into runs of consecutive pages that never cross a multiple of
`chunk_pages` (counted from the start of the range) and maps each run as one chunk of exactly its size:
a whole chunk for a whole aligned group, a smaller one for the tail of the weights. KV pages are mapped
one by one, each a one-page chunk, so that they can be unmapped one by one.

Sizes: a run takes a free chunk of its size; if there is none, the pool creates one within the budget,
first destroying free chunks of other sizes if the budget has no room (whole chunks last). That is the
fallback when memory is fragmented into single pages: destroying 32 free pages and creating one chunk
costs less than mapping 32 pages one by one, and the chunk serves the next activation too.
`replenish_reserve` (off the hot path) keeps a stock of free single pages for KV growth and merges surplus
loose free pages back into whole chunks.

Unmapping: cuMemUnmap cannot unmap part of a mapping, so the pages of one chunk are unmapped together;
unmapping part of a weights run is misuse (ValueError). Weights are unmapped whole at eviction anyway.

Budget and reserve: physical pages in use are always `pages_mapped + pages_reserved` (the reserve is the
pages of free chunks). The pool keeps that within the budget and the reserve near its target by destroying
free chunks (largest first). A shrink below what is mapped never touches mapped pages: maps fail until
clients have unmapped enough (`set_budget` says how many pages are over). On a GPU the worker creates
every page up front (reserve_pages = budget_pages): a stock of `chunk_pages` single pages, whole chunks,
and single pages for a budget that is not a multiple of the chunk.

Capture scratch: `map_scratch` backs a whole weights range with the pool's scratch instead of its own
pages: one whole chunk mapped again at every aligned group, one page again at every page of the tail, as
kvcached maps a zero page. It is for recording CUDA graphs before a model is active (the kernels record
addresses; what they read there is garbage, what they write is lost), so that a capture ahead of an
activation costs at most `chunk_pages + 1` pages of the budget, not the model's weights. The scratch's
pages count as mapped while any range holds it, under no owner. (On the host backend every mapping is
backed on touch by pages of its own; nothing captures graphs there.)

Idle pages: a client may keep mapped pages that hold nothing (a KV space's hysteresis). It registers
itself with `add_reclaimer`, and when another client's `map_pages` runs short the pool asks such clients
to give idle pages back before it answers False, so hysteresis never starves another model.

Failure kinds (STYLE.md): running out of budget is an ordinary result (`map_pages` returns False and maps
nothing); misuse (unknown range, mapping a mapped page, unmapping part of a run) raises ValueError; a
backend failure raises BackendError after rolling back what this call mapped (free chunks it destroyed to
make room stay destroyed: the books stay exact). `audit()` asserts the pool's invariants.

Thread safety: one lock guards the pool's state, so any thread may call it (a loader thread mapping
weights, the worker loop allocating KV). Clients such as KVSpace belong to one thread; reclaim calls a
client from the thread that ran short, which is the worker loop in this project.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator

import torch

from memory.backend import BackendError, PageBackend
from memory.chunks import ChunkSet, PhysicalChunk
from memory.ranges import IdlePageHolder, MemoryKind, PoolSnapshot, VirtualRange

__all__ = ["DEFAULT_CHUNK_PAGES", "IdlePageHolder", "MemoryKind", "PagePool", "PoolSnapshot", "VirtualRange"]

logger = logging.getLogger("prism.memory")

DEFAULT_CHUNK_PAGES = 32  # 64 MiB chunks of 2 MiB pages
MAX_MERGES_PER_REPLENISH = 8  # whole chunks rebuilt per replenish_reserve call (~0.7 ms each on an H100)

# A mapping: (index of its first page in the range, the chunk mapped there whole).
Mapping = tuple[int, PhysicalChunk]


class PagePool:
    def __init__(
        self, backend: PageBackend, budget_bytes: int, reserve_pages: int = 4, chunk_pages: int = DEFAULT_CHUNK_PAGES
    ):
        if budget_bytes < 0 or reserve_pages < 0:
            raise ValueError(f"budget_bytes ({budget_bytes}) and reserve_pages ({reserve_pages}) must be >= 0")
        if chunk_pages < 1:
            raise ValueError(f"chunk_pages must be >= 1, not {chunk_pages}")
        self.backend = backend
        self.page_bytes = backend.page_bytes
        self.chunk_pages = chunk_pages
        self._budget_pages = budget_bytes // self.page_bytes
        self._reserve_target = reserve_pages
        self._chunks = ChunkSet(chunk_pages)  # created physical memory; the pages of free chunks are the reserve
        self._num_mapped = 0
        self._pages_by_owner: Counter[tuple[str, MemoryKind]] = Counter()
        self._ranges: set[VirtualRange] = set()  # live ranges (compared by identity)
        self._idle_holders: dict[VirtualRange, IdlePageHolder] = {}
        self._num_mapped_total = 0
        self._num_unmapped_total = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when mapped pages fall or the budget grows
        self._num_waiters = 0  # threads in wait_until_within_budget: unmaps notify only when there are some
        self._num_created_total = 0  # pages created since the pool was built
        self._scratch: dict[int, PhysicalChunk] = {}  # size in pages -> the capture scratch's chunk of that size
        self._scratch_users: dict[VirtualRange, list[tuple[int, int]]] = {}  # range -> (first page, pages) mapped

    # --- budget ---------------------------------------------------------------------------------

    @property
    def budget_pages(self) -> int:
        return self._budget_pages

    @property
    def num_free_pages(self) -> int:
        return max(0, self._budget_pages - self._num_mapped)

    @property
    def num_mapped_pages(self) -> int:
        return self._num_mapped

    def set_budget(self, budget_bytes: int) -> int:
        """Change the budget. Shrinking never touches mapped pages: maps fail until enough are unmapped.

        Returns the number of mapped pages over the new budget (0 when it already fits), which the
        caller frees by evicting or trimming its clients.
        """
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        with self._lock:
            self._budget_pages = budget_bytes // self.page_bytes
            self._trim_reserve_locked()
            if self._num_waiters:
                self._changed.notify_all()
            return max(0, self._num_mapped - self._budget_pages)

    def wait_until_within_budget(self, timeout_s: float | None = None) -> bool:
        """Block until mapped pages fit the budget (after a shrink); False on timeout."""
        with self._changed:
            self._num_waiters += 1
            try:
                return self._changed.wait_for(lambda: self._num_mapped <= self._budget_pages, timeout_s)
            finally:
                self._num_waiters -= 1

    # --- ranges ---------------------------------------------------------------------------------

    def reserve_range(self, owner: str, kind: MemoryKind, num_bytes: int) -> VirtualRange:
        """Reserve address space for `num_bytes` (rounded up to whole pages); nothing is mapped yet."""
        if num_bytes <= 0:
            raise ValueError(f"cannot reserve {num_bytes} bytes for {owner}")
        num_pages = -(-num_bytes // self.page_bytes)
        base = self.backend.reserve(num_pages * self.page_bytes)
        vrange = VirtualRange(owner, MemoryKind(kind), base, num_pages, self.page_bytes, [None] * num_pages)
        with self._lock:
            self._ranges.add(vrange)
        return vrange

    def release_range(self, vrange: VirtualRange) -> None:
        """Unmap every page of the range and give its address space back.

        Tensors viewing the range must be dropped first: on a GPU they would point at freed address space.
        """
        with self._lock:
            self._check_live(vrange)
            if vrange in self._scratch_users:
                self.backend.synchronize()
                self._unmap_scratch_locked(vrange)
            self._unmap_locked(vrange, [(i, h[0]) for i, h in enumerate(vrange.handles) if h is not None and h[1] == 0])
            self._ranges.discard(vrange)
            self._idle_holders.pop(vrange, None)
            vrange.released = True
        self.backend.release(vrange.base, vrange.num_bytes)

    def tensor(self, vrange: VirtualRange) -> torch.Tensor:
        """A uint8 view of the whole range; only bytes on mapped pages may be touched."""
        with self._lock:
            self._check_live(vrange)
        return self.backend.tensor(vrange.base, vrange.num_bytes)

    # --- mapping --------------------------------------------------------------------------------

    def map_pages(self, vrange: VirtualRange, page_indices: Iterable[int]) -> bool:
        """Map physical pages at these indices: all of them, or (budget exhausted) none and False.

        When the budget is short, idle pages of other clients are reclaimed first, if there are enough.
        On a WEIGHTS range, consecutive pages are mapped in runs of one chunk each (see the module
        docstring): a whole aligned group of `chunk_pages` pages is one driver call.
        """
        indices = list(dict.fromkeys(page_indices))
        if not indices:
            return True
        num_short = self._map_or_count_shortage(vrange, indices)
        if num_short == 0:
            return True
        if not self.reclaim_idle(num_short, exclude=vrange):
            return False
        return self._map_or_count_shortage(vrange, indices) == 0

    def unmap_pages(self, vrange: VirtualRange, page_indices: Iterable[int]) -> None:
        """Unmap these pages; their physical pages go back to the reserve (or are destroyed past it).

        Pages mapped as one run (weights) must be unmapped together: a ValueError names the run otherwise.
        """
        indices = list(dict.fromkeys(page_indices))
        if not indices:
            return
        with self._lock:
            self._check_live(vrange)
            self._check_indices(vrange, indices, expect_mapped=True)
            self._unmap_locked(vrange, self._whole_mappings(vrange, indices))

    def add_reclaimer(self, vrange: VirtualRange, holder: IdlePageHolder) -> None:
        """Let the pool ask `holder` for the idle pages of `vrange` when another client runs short."""
        with self._lock:
            self._check_live(vrange)
            self._idle_holders[vrange] = holder

    def reclaim_idle(self, num_pages: int, exclude: VirtualRange | None = None) -> bool:
        """Have idle-page holders (but `exclude`) unmap `num_pages` pages; True if they did.

        All or nothing: when the holders have fewer idle pages than asked, nothing is unmapped.
        """
        with self._lock:
            holders = [h for r, h in self._idle_holders.items() if r is not exclude]
        if sum(h.num_idle_pages for h in holders) < num_pages:
            return False
        remaining = num_pages
        for holder in sorted(holders, key=lambda h: -h.num_idle_pages):  # fewest clients disturbed
            if remaining <= 0:
                break
            remaining -= holder.give_back_idle(remaining)
        return remaining <= 0

    def replenish_reserve(self) -> int:
        """Bring the reserve to its target within the budget, off the hot path; return the pages created.

        In order: a stock of min(chunk_pages, reserve_pages) free single pages for KV growth (splitting a
        free chunk when the budget has no room); surplus loose free pages (beyond twice that stock) merged
        back into whole chunks, at most MAX_MERGES_PER_REPLENISH per call; whole chunks, then single pages
        for the rest, up to the reserve target. With reserve_pages = budget_pages every page is created.
        """
        with self._lock:
            created_before = self._num_created_total
            self._trim_reserve_locked()
            self._stock_single_pages_locked()
            self._merge_loose_pages_locked()
            chunks, chunk_pages = self._chunks, self.chunk_pages
            while chunks.num_free < self._reserve_target and chunks.num_pages < self._budget_pages:
                room = self._budget_pages - chunks.num_pages
                self._create_chunk_locked(chunk_pages if room >= chunk_pages else 1, free=True)
            self._trim_reserve_locked()
            return self._num_created_total - created_before

    def close(self) -> None:
        """Destroy the reserve. Live ranges stay with their clients; chunks they empty later are destroyed."""
        with self._lock:
            self._reserve_target = 0
            self._trim_reserve_locked()

    # --- capture scratch (see the module docstring) ---------------------------------------------

    def scratch_pages_for(self, vrange: VirtualRange) -> int:
        """Pages of the budget that `map_scratch(vrange)` would take now (0 for sizes already lent)."""
        with self._lock:
            return sum(size for size in self._scratch_sizes(vrange) if size not in self._scratch)

    def scratch_handles(self) -> set:
        """The backend handles of the scratch's chunks (the only pages the pool maps at several places)."""
        with self._lock:
            return {chunk.handle for chunk in self._scratch.values()}

    def map_scratch(self, vrange: VirtualRange) -> bool:
        """Back every page of an unmapped WEIGHTS range with the capture scratch; False, mapping nothing,
        when the budget cannot lend the scratch's pages (idle pages of other clients are reclaimed first)."""
        with self._lock:
            self._check_live(vrange)
            if vrange.kind is not MemoryKind.WEIGHTS or vrange.num_mapped or vrange in self._scratch_users:
                raise ValueError(f"the capture scratch backs only a wholly unmapped weights range, not "
                                 f"{vrange.owner}/{vrange.kind.value} ({vrange.num_mapped} pages mapped)")
            num_short = self._scratch_shortage_locked(vrange)
        if num_short > 0 and not self.reclaim_idle(num_short, exclude=vrange):
            return False
        with self._lock:
            if self._scratch_shortage_locked(vrange) > 0:
                return False
            page_bytes, mapped = self.page_bytes, []
            try:
                for size in self._scratch_sizes(vrange):
                    if size not in self._scratch:
                        self._scratch[size] = self._chunks.take(size) or self._create_chunk_locked(size, free=False)
                        self._num_mapped += size
                for first, count in self._scratch_runs(vrange):
                    self.backend.map(vrange.base + first * page_bytes, count * page_bytes, self._scratch[count].handle, 0)
                    mapped.append((first, count))
                self.backend.set_access(vrange.base, vrange.num_bytes)
            except BackendError:
                self._scratch_users[vrange] = mapped
                self._unmap_scratch_locked(vrange)
                raise
            self._scratch_users[vrange] = mapped
            return True

    def unmap_scratch(self, vrange: VirtualRange) -> None:
        """Take the capture scratch out of `vrange` (after one device synchronisation); the last range to
        give it back returns its chunks to the reserve."""
        with self._lock:
            self._check_live(vrange)
            if vrange not in self._scratch_users:
                raise ValueError(f"{vrange.owner}/{vrange.kind.value} does not hold the capture scratch")
            self.backend.synchronize()
            self._unmap_scratch_locked(vrange)

    def _scratch_sizes(self, vrange: VirtualRange) -> set[int]:
        return {count for _, count in self._scratch_runs(vrange)}

    def _scratch_runs(self, vrange: VirtualRange) -> list[tuple[int, int]]:
        """(first page, pages) of each scratch mapping: whole aligned groups, then the tail page by page."""
        chunk_pages, num_pages = self.chunk_pages, vrange.num_pages
        whole_end = num_pages - num_pages % chunk_pages
        return [(first, chunk_pages) for first in range(0, whole_end, chunk_pages)] + [(i, 1) for i in range(whole_end, num_pages)]

    def _scratch_shortage_locked(self, vrange: VirtualRange) -> int:
        missing = sum(size for size in self._scratch_sizes(vrange) if size not in self._scratch)
        return self._num_mapped + missing - self._budget_pages

    def _unmap_scratch_locked(self, vrange: VirtualRange) -> None:
        mapped = self._scratch_users.pop(vrange)
        try:
            for first, count in mapped:
                self.backend.unmap(vrange.base + first * self.page_bytes, count * self.page_bytes)
        finally:
            if not self._scratch_users:
                for chunk in self._scratch.values():
                    self._chunks.put(chunk)
                    self._num_mapped -= chunk.num_pages
                self._scratch.clear()
                self._trim_reserve_locked()
                if self._num_waiters:
                    self._changed.notify_all()

    # --- accounting -----------------------------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            kv = {o: n for (o, k), n in self._pages_by_owner.items() if k is MemoryKind.KV and n}
            weights = {o: n for (o, k), n in self._pages_by_owner.items() if k is MemoryKind.WEIGHTS and n}
            return PoolSnapshot(
                self._budget_pages,
                self.page_bytes,
                self._num_mapped,
                self._chunks.num_free,
                kv,
                weights,
                self._num_mapped_total,
                self._num_unmapped_total,
                self.chunk_pages,
                self._chunks.num_chunks,
                self._chunks.num_free_chunks,
                sum(chunk.num_pages for chunk in self._scratch.values()),
                len(self._ranges),
                sum(r.num_bytes for r in self._ranges),
            )

    def pages_of(self, owner: str, kind: MemoryKind) -> int:
        with self._lock:
            return self._pages_by_owner[(owner, MemoryKind(kind))]

    def audit(self) -> None:
        """Assert the pool's invariants (tests and debugging; O(pages of all live ranges))."""
        with self._lock:
            by_owner: Counter[tuple[str, MemoryKind]] = Counter()
            in_use: dict[PhysicalChunk, int] = {}  # chunk -> its pages mapped somewhere
            for vrange in self._ranges:
                by_owner[(vrange.owner, vrange.kind)] += self._audit_range(vrange, in_use)
            for chunk in self._scratch.values():
                in_use[chunk] = chunk.num_pages
            assert self._scratch_users or not self._scratch, "the capture scratch is held by no range"
            num_scratch = sum(c.num_pages for c in self._scratch.values())
            assert sum(by_owner.values()) + num_scratch == self._num_mapped, "pages_mapped disagrees with the ranges"
            assert +by_owner == +self._pages_by_owner, "per-owner pages disagree with the ranges"
            chunks = self._chunks
            chunks.audit(in_use)
            for chunk in chunks.free_chunks():  # what `_trim_reserve_locked` would destroy is gone
                assert chunks.num_pages <= self._budget_pages, "a free chunk is kept over the budget"
                assert chunks.num_free - chunk.num_pages < self._reserve_target, "reserve above its target"

    # --- internals: mapping ---------------------------------------------------------------------

    def _map_or_count_shortage(self, vrange: VirtualRange, indices: list[int]) -> int:
        """Map all of `indices` and return 0, or map nothing and return how many pages the budget lacks."""
        with self._lock:
            self._check_live(vrange)
            self._check_indices(vrange, indices, expect_mapped=False)
            if vrange in self._scratch_users:
                raise ValueError(f"{vrange.owner}/{vrange.kind.value} holds the capture scratch: unmap it first")
            num_short = self._num_mapped + len(indices) - self._budget_pages
            if num_short > 0:
                return num_short
            ordered = sorted(indices)
            mapped: list[Mapping] = []
            try:
                runs = [(i, 1) for i in ordered] if vrange.kind is MemoryKind.KV else self._weight_runs(ordered)
                for first, count in runs:
                    self._map_run_locked(vrange, first, count, mapped)
                for first, count in _consecutive(ordered):
                    self.backend.set_access(vrange.base + first * self.page_bytes, count * self.page_bytes)
            except BackendError:
                self._roll_back_locked(vrange, mapped)
                raise
            self._num_mapped_total += len(indices)
            return 0

    def _weight_runs(self, ordered: list[int]) -> list[tuple[int, int]]:
        """(first, count) of each run of weights: consecutive pages within one aligned group of a chunk."""
        chunk_pages = self.chunk_pages
        runs = []
        start = previous = ordered[0]
        for i in ordered[1:]:
            if i != previous + 1 or i % chunk_pages == 0:
                runs.append((start, previous - start + 1))
                start = i
            previous = i
        runs.append((start, previous - start + 1))
        return runs

    def _map_run_locked(self, vrange: VirtualRange, first: int, count: int, mapped: list[Mapping]) -> None:
        """Map a chunk of `count` pages whole at page `first`: one backend call; book it."""
        chunk = self._chunks.take(count) or self._create_chunk_locked(count, free=False)
        page_bytes = self.page_bytes
        try:
            self.backend.map(vrange.base + first * page_bytes, count * page_bytes, chunk.handle, 0)
        except BackendError:
            self._chunks.put(chunk)
            raise
        if count == 1:
            vrange.handles[first] = chunk.pages[0]
        else:
            vrange.handles[first : first + count] = chunk.pages
        mapped.append((first, chunk))
        self._count_locked(vrange, count)

    def _create_chunk_locked(self, num_pages: int, free: bool) -> PhysicalChunk:
        """Create a chunk of `num_pages` pages, destroying free chunks of other sizes first if the budget
        has no room for it (the budget check guarantees that enough are free)."""
        chunks = self._chunks
        room = self._budget_pages - chunks.num_pages
        if room < num_pages:
            victims = chunks.victims(num_pages - room, keep_size=num_pages)
            assert victims, "no room for a chunk within the budget"
            for victim in victims:
                self._destroy_chunk_locked(victim)
        chunk = PhysicalChunk(self.backend.create_chunk(num_pages * self.page_bytes), num_pages)
        chunks.add(chunk, free=free)
        self._num_created_total += num_pages
        return chunk

    def _destroy_chunk_locked(self, chunk: PhysicalChunk) -> None:
        self.backend.destroy_chunk(chunk.handle)
        self._chunks.remove(chunk)

    # --- internals: the reserve -----------------------------------------------------------------

    def _stock_single_pages_locked(self) -> None:
        # KV maps one page at a time: keep some free single pages so that it rarely creates one.
        chunks = self._chunks
        stock = min(self.chunk_pages, self._reserve_target)
        while chunks.num_free_of_size(1) < stock and chunks.num_pages - chunks.num_free < self._budget_pages:
            if chunks.num_pages >= self._budget_pages and not chunks.victims(1, keep_size=1):
                return
            self._create_chunk_locked(1, free=True)

    def _merge_loose_pages_locked(self) -> None:
        # Free pages in chunks smaller than a whole one, beyond twice the single-page stock, become whole
        # chunks again, so that the next activation maps its weights with one call per chunk.
        chunks, chunk_pages = self._chunks, self.chunk_pages
        if chunk_pages == 1:
            return
        keep = 2 * min(chunk_pages, self._reserve_target)
        for _ in range(MAX_MERGES_PER_REPLENISH):
            loose = chunks.num_free - chunk_pages * chunks.num_free_chunks
            if loose - chunk_pages < keep:
                return
            room = self._budget_pages - chunks.num_pages
            for victim in chunks.victims(max(0, chunk_pages - room), keep_size=chunk_pages):
                self._destroy_chunk_locked(victim)
            if self._budget_pages - chunks.num_pages < chunk_pages:
                return
            self._create_chunk_locked(chunk_pages, free=True)

    def _trim_reserve_locked(self) -> None:
        # Destroy free chunks (largest first) while created pages exceed the budget or the reserve stays at
        # or above its target without them.
        chunks = self._chunks
        if chunks.num_pages <= self._budget_pages and chunks.num_free <= self._reserve_target:
            return
        for chunk in chunks.free_chunks():
            if chunks.num_pages > self._budget_pages or chunks.num_free - chunk.num_pages >= self._reserve_target:
                self._destroy_chunk_locked(chunk)

    # --- internals: unmapping -------------------------------------------------------------------

    @staticmethod
    def _whole_mappings(vrange: VirtualRange, indices: list[int]) -> list[Mapping]:
        """The mappings under these mapped pages; ValueError unless each is covered whole."""
        handles = vrange.handles
        if vrange.kind is MemoryKind.KV:  # a page per chunk
            return [(i, handles[i][0]) for i in indices]
        asked: dict[PhysicalChunk, list[int]] = {}  # chunk -> [first page, pages asked]
        for i in indices:
            chunk, index = handles[i]
            entry = asked.get(chunk)
            if entry is None:
                asked[chunk] = [i - index, 1]
            else:
                entry[1] += 1
        for chunk, (first, num_asked) in asked.items():
            if num_asked != chunk.num_pages:
                raise ValueError(
                    f"pages {first}-{first + chunk.num_pages - 1} of {vrange.owner}/{vrange.kind.value} were mapped "
                    f"as one run and must be unmapped together; {num_asked} of them were asked"
                )
        return [(first, chunk) for chunk, (first, _) in asked.items()]

    def _unmap_locked(self, vrange: VirtualRange, mappings: list[Mapping]) -> None:
        """Unmap whole mappings after one device synchronisation; their chunks go back to the reserve."""
        if not mappings:
            return
        try:
            self.backend.synchronize()
            self._unmap_mappings_locked(vrange, mappings, churn=True)
        finally:
            self._trim_reserve_locked()
            if self._num_waiters:
                self._changed.notify_all()

    def _unmap_mappings_locked(self, vrange: VirtualRange, mappings: list[Mapping], churn: bool) -> None:
        backend, put, page_bytes = self.backend, self._chunks.put, self.page_bytes
        handles, base = vrange.handles, vrange.base
        num_unmapped = 0
        try:
            for first, chunk in mappings:
                count = chunk.num_pages
                backend.unmap(base + first * page_bytes, count * page_bytes)
                if count == 1:
                    handles[first] = None
                else:
                    handles[first : first + count] = [None] * count
                put(chunk)
                num_unmapped += count
        finally:  # a failed unmap leaves its mapping (and those after it) mapped and counted
            self._count_locked(vrange, -num_unmapped)
            if churn:
                self._num_unmapped_total += num_unmapped

    def _roll_back_locked(self, vrange: VirtualRange, mapped: list[Mapping]) -> None:
        # The pages never became visible to a caller, so no device work can be using them: no sync.
        # A mapping that cannot be unmapped stays mapped and counted: the accounting is still exact.
        try:
            for mapping in reversed(mapped):
                try:
                    self._unmap_mappings_locked(vrange, [mapping], churn=False)
                except BackendError:
                    logger.exception(
                        "roll-back could not unmap page %d of %s/%s", mapping[0], vrange.owner, vrange.kind.value
                    )
        finally:
            self._trim_reserve_locked()

    # --- internals: books -----------------------------------------------------------------------

    def _count_locked(self, vrange: VirtualRange, delta: int) -> None:
        vrange.num_mapped += delta
        self._num_mapped += delta
        self._pages_by_owner[(vrange.owner, vrange.kind)] += delta

    def _audit_range(self, vrange: VirtualRange, in_use: dict[PhysicalChunk, int]) -> int:
        """Assert that each chunk in the range is mapped whole at consecutive pages; count into `in_use`."""
        num_mapped = 0
        for i, handle in enumerate(vrange.handles):
            if handle is None:
                continue
            num_mapped += 1
            chunk, index = handle
            assert handle is chunk.pages[index], f"{vrange.owner}: page {i} is not one of its chunk's pages"
            first = i - index
            assert first >= 0 and vrange.handles[first] is chunk.pages[0], f"{vrange.owner}: page {i} is out of place"
            in_use[chunk] = in_use.get(chunk, 0) + 1
            if vrange.kind is MemoryKind.KV:
                assert chunk.num_pages == 1, "KV pages are mapped one by one (they are unmapped one by one)"
            else:
                last = first + chunk.num_pages - 1
                assert first // self.chunk_pages == last // self.chunk_pages, f"{chunk} crosses a chunk group"
        assert num_mapped == vrange.num_mapped, f"{vrange.owner}: stale num_mapped"
        return num_mapped

    def _check_live(self, vrange: VirtualRange) -> None:
        if vrange not in self._ranges:
            raise ValueError(f"range of {vrange.owner}/{vrange.kind.value} is not live in this pool")

    @staticmethod
    def _check_indices(vrange: VirtualRange, indices: list[int], expect_mapped: bool) -> None:
        handles, num_pages = vrange.handles, vrange.num_pages
        for i in indices:
            if not 0 <= i < num_pages:
                raise ValueError(f"page {i} outside the {num_pages} pages of {vrange.owner}/{vrange.kind.value}")
            if (handles[i] is not None) != expect_mapped:
                state = "not mapped" if expect_mapped else "already mapped"
                raise ValueError(f"page {i} of {vrange.owner}/{vrange.kind.value} is {state}")


def _consecutive(ordered: list[int]) -> Iterator[tuple[int, int]]:
    """(first index, length) of each run of consecutive indices in an ascending list."""
    start = previous = ordered[0]
    for i in ordered[1:]:
        if i != previous + 1:
            yield start, previous - start + 1
            start = i
        previous = i
    yield start, previous - start + 1
