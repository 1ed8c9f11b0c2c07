"""A backend wrapper that asserts the contract the pool must keep with any backend, and factories.

It sits between the pool and a real backend (host memory, so data tests read and write real bytes) and
keeps its own books: which physical pages exist, where each is mapped, which pages are accessible. A pool
that maps one page into two places, maps over a mapped page, destroys a mapped page, releases a range
with pages still mapped, or leaks a page trips an assertion here, independently of the pool's own counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memory import FaultInjectingBackend, HostBackend, PagePool
from memory.backend import PageBackend


class CheckingBackend:
    def __init__(self, inner: PageBackend):
        self.inner = inner
        self.device = inner.device
        self.page_bytes = inner.page_bytes
        self.reservations: dict[int, int] = {}  # base -> bytes
        self.live_pages: set[Any] = set()
        self.page_at: dict[int, Any] = {}  # address -> physical page mapped there
        self.address_of: dict[Any, int] = {}  # physical page -> address it is mapped at
        self.accessible: set[int] = set()  # page addresses readable and writable
        self.num_synchronize = 0

    # --- PageBackend ----------------------------------------------------------------------------

    def reserve(self, num_bytes: int) -> int:
        assert num_bytes > 0 and num_bytes % self.page_bytes == 0, f"bad reservation size {num_bytes}"
        base = self.inner.reserve(num_bytes)
        self.reservations[base] = num_bytes
        return base

    def release(self, base: int, num_bytes: int) -> None:
        assert self.reservations.get(base) == num_bytes, "release of an unknown reservation"
        assert not any(base <= a < base + num_bytes for a in self.page_at), "release with pages still mapped"
        self.inner.release(base, num_bytes)
        del self.reservations[base]

    def create_page(self) -> Any:
        handle = self.inner.create_page()
        assert handle not in self.live_pages, "backend handed out a live page twice"
        self.live_pages.add(handle)
        return handle

    def destroy_page(self, handle: Any) -> None:
        assert handle in self.live_pages, "destroying a page that does not exist"
        assert handle not in self.address_of, "destroying a mapped page"
        self.inner.destroy_page(handle)
        self.live_pages.remove(handle)

    def map(self, address: int, handle: Any) -> None:
        assert handle in self.live_pages, "mapping a page that does not exist"
        assert handle not in self.address_of, f"page already mapped at {self.address_of.get(handle):#x}"
        assert address not in self.page_at, f"address {address:#x} already mapped"
        assert self._inside_reservation(address), f"address {address:#x} outside every reservation"
        self.inner.map(address, handle)
        self.page_at[address] = handle
        self.address_of[handle] = address

    def set_access(self, address: int, num_bytes: int) -> None:
        assert num_bytes > 0 and num_bytes % self.page_bytes == 0
        pages = range(address, address + num_bytes, self.page_bytes)
        assert all(a in self.page_at for a in pages), "set_access over unmapped pages"
        self.inner.set_access(address, num_bytes)
        self.accessible.update(pages)

    def synchronize(self) -> None:
        self.num_synchronize += 1
        self.inner.synchronize()

    def unmap(self, address: int) -> None:
        assert address in self.page_at, f"unmapping {address:#x}, which is not mapped"
        self.inner.unmap(address)
        del self.address_of[self.page_at.pop(address)]
        self.accessible.discard(address)

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        return self.inner.tensor(base, num_bytes)

    # --- checks ---------------------------------------------------------------------------------

    def is_usable(self, address: int, num_bytes: int) -> bool:
        """Every page under [address, address + num_bytes) is mapped and accessible."""
        base = next(b for b, size in self.reservations.items() if b <= address < b + size)
        first = base + (address - base) // self.page_bytes * self.page_bytes
        return all(a in self.accessible for a in range(first, address + num_bytes, self.page_bytes))

    @property
    def num_mapped(self) -> int:
        return len(self.page_at)

    def _inside_reservation(self, address: int) -> bool:
        return any(base <= address < base + size for base, size in self.reservations.items())


@dataclass
class PoolRig:
    """A pool over host memory with the checker (and fault injector) between them."""

    pool: PagePool
    checker: CheckingBackend
    faults: FaultInjectingBackend

    def assert_consistent(self) -> None:
        """The pool's books, the checker's books and the budget agree."""
        self.pool.audit()
        snap = self.pool.snapshot()
        assert snap.pages_mapped == self.checker.num_mapped
        assert snap.pages_mapped == sum(snap.kv_pages.values()) + sum(snap.weight_pages.values())
        assert len(self.checker.live_pages) == snap.pages_mapped + snap.pages_reserved, "a physical page leaked"
        assert set(self.checker.accessible) == set(self.checker.page_at), "a mapped page was left inaccessible"


def make_rig(page_bytes: int = 16 * 1024, budget_pages: int = 32, reserve_pages: int = 4) -> PoolRig:
    checker = CheckingBackend(HostBackend(page_bytes))
    faults = FaultInjectingBackend(checker)
    return PoolRig(PagePool(faults, budget_pages * page_bytes, reserve_pages), checker, faults)
