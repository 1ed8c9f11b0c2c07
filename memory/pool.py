"""PagePool: the one owner of a device's physical memory for models.

Clients reserve virtual ranges (one per model and kind: KV or weights) and ask the pool to map physical
pages into them. The pool enforces a page budget that can shrink and grow at run time, keeps a small
reserve of created-but-unmapped pages so that mapping on the hot path skips page creation, and knows at
every moment how many pages each model holds for weights and for KV.

Physical pages in use are always `pages_mapped + pages_reserved`; the pool keeps that within the budget
(the reserve is trimmed first when the budget shrinks). A shrink below what is mapped never touches mapped
pages: maps fail until clients have unmapped enough (`set_budget` says how many pages are over).

Idle pages: a client may keep mapped pages that hold nothing (a KV space's hysteresis). It registers
itself with `add_reclaimer`, and when another client's `map_pages` runs short the pool asks such clients
to give idle pages back before it answers False, so hysteresis never starves another model.

Failure kinds (STYLE.md): running out of budget is an ordinary result (`map_pages` returns False and maps
nothing); misuse (unknown range, mapping a mapped page) raises ValueError; a backend failure raises
BackendError after rolling back what this call mapped. `audit()` asserts the pool's invariants.

Thread safety: one lock guards the pool's state, so any thread may call it (a loader thread mapping
weights, the worker loop allocating KV). Clients such as KVSpace belong to one thread; reclaim calls a
client from the thread that ran short, which is the worker loop in this project.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from memory.backend import BackendError, PageBackend

logger = logging.getLogger("prism.memory")


class MemoryKind(str, enum.Enum):
    KV = "kv"
    WEIGHTS = "weights"


class IdlePageHolder(Protocol):
    """A client that keeps idle mapped pages and can give them back (KVSpace)."""

    @property
    def num_idle_pages(self) -> int: ...

    def give_back_idle(self, num_pages: int) -> int:
        """Unmap up to `num_pages` pages that hold nothing; return how many were unmapped."""


@dataclass(eq=False)
class VirtualRange:
    """A reservation of address space for one owner; `handles[i]` is the physical page at page i.

    Only the pool changes `handles` and `num_mapped`; clients read them.
    """

    owner: str
    kind: MemoryKind
    base: int
    num_pages: int
    page_bytes: int
    handles: list[Any] = field(repr=False)
    num_mapped: int = 0
    released: bool = False

    @property
    def num_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def is_mapped(self, page_index: int) -> bool:
        return self.handles[page_index] is not None

    def address(self, page_index: int) -> int:
        return self.base + page_index * self.page_bytes


@dataclass(frozen=True)
class PoolSnapshot:
    budget_pages: int
    page_bytes: int
    pages_mapped: int
    pages_reserved: int
    kv_pages: dict[str, int]
    weight_pages: dict[str, int]
    num_pages_mapped_total: int = 0  # since the pool was built: map and unmap churn, for metrics
    num_pages_unmapped_total: int = 0

    @property
    def pages_free(self) -> int:
        return max(0, self.budget_pages - self.pages_mapped)

    @property
    def pages_over_budget(self) -> int:
        """Mapped pages beyond the budget after a shrink; clients must unmap this many."""
        return max(0, self.pages_mapped - self.budget_pages)


class PagePool:
    def __init__(self, backend: PageBackend, budget_bytes: int, reserve_pages: int = 4):
        if budget_bytes < 0 or reserve_pages < 0:
            raise ValueError(f"budget_bytes ({budget_bytes}) and reserve_pages ({reserve_pages}) must be >= 0")
        self.backend = backend
        self.page_bytes = backend.page_bytes
        self._budget_pages = budget_bytes // self.page_bytes
        self._reserve_target = reserve_pages
        self._reserve: list[Any] = []  # created physical pages mapped nowhere
        self._num_mapped = 0
        self._pages_by_owner: Counter[tuple[str, MemoryKind]] = Counter()
        self._ranges: set[VirtualRange] = set()  # live ranges (compared by identity)
        self._idle_holders: dict[VirtualRange, IdlePageHolder] = {}
        self._num_mapped_total = 0
        self._num_unmapped_total = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when mapped pages fall or the budget grows

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
            self._changed.notify_all()
            return max(0, self._num_mapped - self._budget_pages)

    def wait_until_within_budget(self, timeout_s: float | None = None) -> bool:
        """Block until mapped pages fit the budget (after a shrink); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._num_mapped <= self._budget_pages, timeout_s)

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
            self._unmap_locked(vrange, [i for i, h in enumerate(vrange.handles) if h is not None])
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
        """Unmap these pages; their physical pages go to the reserve (or are destroyed past it)."""
        indices = list(dict.fromkeys(page_indices))
        if not indices:
            return
        with self._lock:
            self._check_live(vrange)
            self._check_indices(vrange, indices, expect_mapped=True)
            self._unmap_locked(vrange, indices)

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
        """Create physical pages up to the reserve target, within budget; call off the hot path."""
        created = 0
        with self._lock:
            while (
                len(self._reserve) < self._reserve_target
                and self._num_mapped + len(self._reserve) < self._budget_pages
            ):
                self._reserve.append(self.backend.create_page())
                created += 1
        return created

    def close(self) -> None:
        """Destroy the reserve. Live ranges stay with their clients, who release them."""
        with self._lock:
            while self._reserve:
                self.backend.destroy_page(self._reserve.pop())

    # --- accounting -----------------------------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            kv = {o: n for (o, k), n in self._pages_by_owner.items() if k is MemoryKind.KV and n}
            weights = {o: n for (o, k), n in self._pages_by_owner.items() if k is MemoryKind.WEIGHTS and n}
            return PoolSnapshot(
                self._budget_pages,
                self.page_bytes,
                self._num_mapped,
                len(self._reserve),
                kv,
                weights,
                self._num_mapped_total,
                self._num_unmapped_total,
            )

    def pages_of(self, owner: str, kind: MemoryKind) -> int:
        with self._lock:
            return self._pages_by_owner[(owner, MemoryKind(kind))]

    def audit(self) -> None:
        """Assert the pool's invariants (tests and debugging; O(pages of all live ranges))."""
        with self._lock:
            by_owner: Counter[tuple[str, MemoryKind]] = Counter()
            handles = list(self._reserve)
            for vrange in self._ranges:
                mapped = [h for h in vrange.handles if h is not None]
                assert len(mapped) == vrange.num_mapped, f"{vrange.owner}: stale num_mapped"
                by_owner[(vrange.owner, vrange.kind)] += len(mapped)
                handles.extend(mapped)
            assert sum(by_owner.values()) == self._num_mapped, "pages_mapped disagrees with the ranges"
            assert +by_owner == +self._pages_by_owner, "per-owner pages disagree with the ranges"
            assert len({id(h) for h in handles}) == len(handles), "a physical page is in two places"
            assert len(self._reserve) <= self._reserve_target, "reserve above its target"
            within_budget = self._num_mapped + len(self._reserve) <= self._budget_pages
            assert not self._reserve or within_budget, "reserve over budget"

    # --- internals ------------------------------------------------------------------------------

    def _map_or_count_shortage(self, vrange: VirtualRange, indices: list[int]) -> int:
        """Map all of `indices` and return 0, or map nothing and return how many pages the budget lacks."""
        with self._lock:
            self._check_live(vrange)
            self._check_indices(vrange, indices, expect_mapped=False)
            num_short = self._num_mapped + len(indices) - self._budget_pages
            if num_short > 0:
                return num_short
            mapped: list[int] = []
            try:
                for i in indices:
                    self._map_one_locked(vrange, i)
                    mapped.append(i)
                for start, count in _runs(indices):
                    self.backend.set_access(vrange.address(start), count * self.page_bytes)
            except BackendError:
                self._roll_back_locked(vrange, mapped)
                raise
            self._num_mapped_total += len(indices)
            return 0

    def _map_one_locked(self, vrange: VirtualRange, page_index: int) -> None:
        handle = self._reserve.pop() if self._reserve else self.backend.create_page()
        try:
            self.backend.map(vrange.address(page_index), handle)
        except BackendError:
            self._reserve.append(handle)  # trimmed by the roll-back if it overflows the reserve
            raise
        vrange.handles[page_index] = handle
        self._count_locked(vrange, +1)

    def _unmap_locked(self, vrange: VirtualRange, indices: list[int]) -> None:
        if not indices:
            return
        try:
            self.backend.synchronize()
            for i in indices:
                self._unmap_one_locked(vrange, i)
                self._num_unmapped_total += 1
        finally:
            self._trim_reserve_locked()
            self._changed.notify_all()

    def _unmap_one_locked(self, vrange: VirtualRange, page_index: int) -> None:
        handle = vrange.handles[page_index]
        self.backend.unmap(vrange.address(page_index))
        vrange.handles[page_index] = None
        self._reserve.append(handle)
        self._count_locked(vrange, -1)

    def _roll_back_locked(self, vrange: VirtualRange, mapped: list[int]) -> None:
        # The pages never became visible to a caller, so no device work can be using them: no sync.
        try:
            for i in reversed(mapped):
                try:
                    self._unmap_one_locked(vrange, i)
                except BackendError:
                    # The page stays mapped and counted: the accounting is still exact.
                    logger.exception("roll-back could not unmap page %d of %s/%s", i, vrange.owner, vrange.kind.value)
        finally:
            self._trim_reserve_locked()

    def _count_locked(self, vrange: VirtualRange, delta: int) -> None:
        vrange.num_mapped += delta
        self._num_mapped += delta
        self._pages_by_owner[(vrange.owner, vrange.kind)] += delta

    def _trim_reserve_locked(self) -> None:
        # Keep created pages within budget and the reserve at its target size.
        while self._reserve and (
            len(self._reserve) > self._reserve_target
            or self._num_mapped + len(self._reserve) > self._budget_pages
        ):
            self.backend.destroy_page(self._reserve.pop())

    def _check_live(self, vrange: VirtualRange) -> None:
        if vrange not in self._ranges:
            raise ValueError(f"range of {vrange.owner}/{vrange.kind.value} is not live in this pool")

    @staticmethod
    def _check_indices(vrange: VirtualRange, indices: list[int], expect_mapped: bool) -> None:
        for i in indices:
            if not 0 <= i < vrange.num_pages:
                raise ValueError(f"page {i} outside the {vrange.num_pages} pages of {vrange.owner}/{vrange.kind.value}")
            if vrange.is_mapped(i) != expect_mapped:
                state = "not mapped" if expect_mapped else "already mapped"
                raise ValueError(f"page {i} of {vrange.owner}/{vrange.kind.value} is {state}")


def _runs(indices: list[int]) -> Iterator[tuple[int, int]]:
    """(first index, length) of each run of consecutive indices, in ascending order."""
    ordered = sorted(indices)
    start = previous = ordered[0]
    for i in ordered[1:]:
        if i != previous + 1:
            yield start, previous - start + 1
            start = i
        previous = i
    yield start, previous - start + 1
