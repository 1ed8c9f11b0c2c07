"""PagePool: the one owner of a device's physical memory for models.

Clients reserve virtual ranges (one per model and kind: KV or weights) and ask the pool to map physical
pages into them. The pool enforces a page budget that can shrink and grow at run time, keeps a small
reserve of created-but-unmapped pages so that mapping on the hot path skips page creation, and knows at
every moment how many pages each model holds for weights and for KV.

Failure kinds (STYLE.md): running out of budget is an ordinary result (`map_pages` returns False and maps
nothing); misuse (unknown range, mapping a mapped page) raises ValueError; a backend failure raises
BackendError after rolling back what this call mapped.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from memory.backend import BackendError, PageBackend


class MemoryKind(str, enum.Enum):
    KV = "kv"
    WEIGHTS = "weights"


@dataclass(eq=False)
class VirtualRange:
    """A reservation of address space for one owner; `handles[i]` is the physical page at page i."""

    owner: str
    kind: MemoryKind
    base: int
    num_pages: int
    page_bytes: int
    handles: list[Any] = field(repr=False)
    released: bool = False

    @property
    def num_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def num_mapped(self) -> int:
        return sum(h is not None for h in self.handles)

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

    @property
    def pages_free(self) -> int:
        return max(0, self.budget_pages - self.pages_mapped)


class PagePool:
    def __init__(self, backend: PageBackend, budget_bytes: int, reserve_pages: int = 4):
        self.backend = backend
        self.page_bytes = backend.page_bytes
        self._budget_pages = budget_bytes // self.page_bytes
        self._reserve_target = reserve_pages
        self._reserve: list[Any] = []  # created physical pages mapped nowhere
        self._num_mapped = 0
        self._pages_by_owner: Counter[tuple[str, MemoryKind]] = Counter()
        self._ranges: set[int] = set()  # id() of live ranges
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)

    # --- budget ---------------------------------------------------------------------------------

    @property
    def budget_pages(self) -> int:
        return self._budget_pages

    @property
    def num_free_pages(self) -> int:
        return max(0, self._budget_pages - self._num_mapped)

    def set_budget(self, budget_bytes: int) -> int:
        """Change the budget. Shrinking never touches mapped pages: maps fail until enough are unmapped.

        Returns the number of mapped pages over the new budget (0 when it already fits), which the
        caller frees by evicting or trimming its clients.
        """
        with self._lock:
            self._budget_pages = budget_bytes // self.page_bytes
            self._trim_reserve_locked()
            return max(0, self._num_mapped - self._budget_pages)

    def wait_until_within_budget(self, timeout_s: float | None = None) -> bool:
        """Block until mapped pages fit the budget (after a shrink); False on timeout."""
        with self._freed:
            return self._freed.wait_for(lambda: self._num_mapped <= self._budget_pages, timeout_s)

    # --- ranges ---------------------------------------------------------------------------------

    def reserve_range(self, owner: str, kind: MemoryKind, num_bytes: int) -> VirtualRange:
        """Reserve address space for `num_bytes` (rounded up to whole pages); nothing is mapped yet."""
        num_pages = max(1, -(-num_bytes // self.page_bytes))
        base = self.backend.reserve(num_pages * self.page_bytes)
        vrange = VirtualRange(owner, MemoryKind(kind), base, num_pages, self.page_bytes, [None] * num_pages)
        with self._lock:
            self._ranges.add(id(vrange))
        return vrange

    def release_range(self, vrange: VirtualRange) -> None:
        """Unmap every page of the range and give its address space back."""
        self.unmap_pages(vrange, [i for i, h in enumerate(vrange.handles) if h is not None])
        with self._lock:
            self._check_live(vrange)
            self._ranges.discard(id(vrange))
            vrange.released = True
        self.backend.release(vrange.base, vrange.num_bytes)

    def tensor(self, vrange: VirtualRange) -> torch.Tensor:
        """A uint8 view of the whole range; only bytes on mapped pages may be touched."""
        return self.backend.tensor(vrange.base, vrange.num_bytes)

    # --- mapping --------------------------------------------------------------------------------

    def map_pages(self, vrange: VirtualRange, page_indices: Iterable[int]) -> bool:
        """Map physical pages at these indices: all of them, or (budget exhausted) none and False."""
        indices = list(dict.fromkeys(page_indices))
        if not indices:
            return True
        with self._lock:
            self._check_live(vrange)
            for i in indices:
                if not 0 <= i < vrange.num_pages:
                    raise ValueError(f"page {i} outside range of {vrange.num_pages} pages")
                if vrange.handles[i] is not None:
                    raise ValueError(f"page {i} of {vrange.owner}/{vrange.kind.value} is already mapped")
            if self._num_mapped + len(indices) > self._budget_pages:
                return False
            done: list[int] = []
            try:
                for i in indices:
                    handle = self._reserve.pop() if self._reserve else self.backend.create_page()
                    try:
                        self.backend.map(vrange.address(i), handle)
                    except BackendError:
                        self._reserve.append(handle)
                        raise
                    vrange.handles[i] = handle
                    done.append(i)
            except BackendError:
                for i in done:
                    self._unmap_one_locked(vrange, i)
                raise
            self._num_mapped += len(done)
            self._pages_by_owner[(vrange.owner, vrange.kind)] += len(done)
            return True

    def unmap_pages(self, vrange: VirtualRange, page_indices: Iterable[int]) -> None:
        """Unmap these pages; their physical pages go to the reserve (or are destroyed past it)."""
        indices = list(dict.fromkeys(page_indices))
        if not indices:
            return
        with self._lock:
            self._check_live(vrange)
            for i in indices:
                if vrange.handles[i] is None:
                    raise ValueError(f"page {i} of {vrange.owner}/{vrange.kind.value} is not mapped")
            for i in indices:
                self._unmap_one_locked(vrange, i)
            self._num_mapped -= len(indices)
            self._pages_by_owner[(vrange.owner, vrange.kind)] -= len(indices)
            self._trim_reserve_locked()
            self._freed.notify_all()

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
        with self._lock:
            while self._reserve:
                self.backend.destroy_page(self._reserve.pop())

    # --- accounting -----------------------------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            kv = {o: n for (o, k), n in self._pages_by_owner.items() if k is MemoryKind.KV and n}
            weights = {o: n for (o, k), n in self._pages_by_owner.items() if k is MemoryKind.WEIGHTS and n}
            return PoolSnapshot(self._budget_pages, self.page_bytes, self._num_mapped, len(self._reserve), kv, weights)

    def pages_of(self, owner: str, kind: MemoryKind) -> int:
        with self._lock:
            return self._pages_by_owner[(owner, MemoryKind(kind))]

    # --- internals ------------------------------------------------------------------------------

    def _unmap_one_locked(self, vrange: VirtualRange, page_index: int) -> None:
        handle = vrange.handles[page_index]
        self.backend.unmap(vrange.address(page_index))
        vrange.handles[page_index] = None
        self._reserve.append(handle)

    def _trim_reserve_locked(self) -> None:
        # Keep created pages within budget and the reserve at its target size.
        while self._reserve and (
            len(self._reserve) > self._reserve_target
            or self._num_mapped + len(self._reserve) > self._budget_pages
        ):
            self.backend.destroy_page(self._reserve.pop())

    def _check_live(self, vrange: VirtualRange) -> None:
        if id(vrange) not in self._ranges or vrange.released:
            raise ValueError(f"range of {vrange.owner}/{vrange.kind.value} is not live in this pool")
