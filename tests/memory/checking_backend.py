"""A backend wrapper that asserts the contract the pool must keep with any backend, and factories.

It sits between the pool and a real backend (host memory, so data tests read and write real bytes) and
keeps its own books: which chunks exist, which page of which chunk is mapped where, the extent of every
mapping, which pages are accessible. It enforces what the lent H100's driver does: a map covers a whole
chunk (cuMemMap of part of one fails with CUDA_ERROR_NOT_SUPPORTED) and an unmap exactly one whole
mapping (cuMemUnmap's rule). A pool that maps one physical page into two places (other than the capture
scratch, which `PoolRig.assert_consistent` lets only the pool's scratch chunks do), maps over a mapped page,
maps part of a chunk, unmaps anything but one whole mapping, destroys a chunk with a page still mapped,
releases a range with pages still mapped, or leaks a chunk trips an assertion here, independently of the
pool's own counts.
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
        self.chunks: dict[Any, int] = {}  # live chunk handle -> pages
        self.mappings: dict[int, tuple[int, Any, int]] = {}  # mapping start -> (pages, chunk, first page in chunk)
        self.page_at: dict[int, tuple[Any, int]] = {}  # page address -> (chunk, page in chunk) mapped there
        self.address_of: dict[tuple[Any, int], list[int]] = {}  # (chunk, page in chunk) -> addresses it is mapped at
        self.accessible: set[int] = set()  # page addresses readable and writable
        self.map_sizes: list[int] = []  # pages per map call, in order
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

    def create_chunk(self, num_bytes: int) -> Any:
        assert num_bytes > 0 and num_bytes % self.page_bytes == 0, f"bad chunk size {num_bytes}"
        handle = self.inner.create_chunk(num_bytes)
        assert handle not in self.chunks, "backend handed out a live chunk twice"
        self.chunks[handle] = num_bytes // self.page_bytes
        return handle

    def destroy_chunk(self, handle: Any) -> None:
        assert handle in self.chunks, "destroying a chunk that does not exist"
        assert not any((handle, i) in self.address_of for i in range(self.chunks[handle])), "destroying a mapped chunk"
        self.inner.destroy_chunk(handle)
        del self.chunks[handle]

    def map(self, address: int, num_bytes: int, handle: Any, offset: int) -> None:
        page = self.page_bytes
        assert handle in self.chunks, "mapping a chunk that does not exist"
        assert num_bytes > 0 and num_bytes % page == 0 and offset % page == 0
        first, count = offset // page, num_bytes // page
        assert first == 0 and count == self.chunks[handle], "mapping part of a chunk (the driver refuses it)"
        for i in range(count):
            assert address + i * page not in self.page_at, f"address {address + i * page:#x} already mapped"
        assert self._inside_one_reservation(address, num_bytes), f"[{address:#x}, +{num_bytes}) outside a reservation"
        self.inner.map(address, num_bytes, handle, offset)
        self.mappings[address] = (count, handle, first)
        self.map_sizes.append(count)
        for i in range(count):
            self.page_at[address + i * page] = (handle, first + i)
            self.address_of.setdefault((handle, first + i), []).append(address + i * page)

    def set_access(self, address: int, num_bytes: int) -> None:
        assert num_bytes > 0 and num_bytes % self.page_bytes == 0
        pages = range(address, address + num_bytes, self.page_bytes)
        assert all(a in self.page_at for a in pages), "set_access over unmapped pages"
        self.inner.set_access(address, num_bytes)
        self.accessible.update(pages)

    def synchronize(self) -> None:
        self.num_synchronize += 1
        self.inner.synchronize()

    def unmap(self, address: int, num_bytes: int) -> None:
        assert address in self.mappings, f"unmapping {address:#x}, where no mapping starts"
        count, handle, first = self.mappings[address]
        assert num_bytes == count * self.page_bytes, "unmapping part of a mapping (cuMemUnmap forbids it)"
        self.inner.unmap(address, num_bytes)
        del self.mappings[address]
        for i in range(count):
            a = address + i * self.page_bytes
            physical = self.page_at.pop(a)
            self.address_of[physical].remove(a)
            if not self.address_of[physical]:
                del self.address_of[physical]
            self.accessible.discard(a)

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
        """Physical pages mapped somewhere (a page mapped at several addresses counts once)."""
        return len(self.address_of)

    def multiply_mapped_chunks(self) -> set[Any]:
        return {handle for (handle, _), addresses in self.address_of.items() if len(addresses) > 1}

    @property
    def num_created_pages(self) -> int:
        return sum(self.chunks.values())

    def _inside_one_reservation(self, address: int, num_bytes: int) -> bool:
        """[address, address + num_bytes) lies in one reservation, at a whole page from its base."""
        return any(
            base <= address and address + num_bytes <= base + size and (address - base) % self.page_bytes == 0
            for base, size in self.reservations.items()
        )


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
        assert snap.pages_mapped == sum(snap.kv_pages.values()) + sum(snap.weight_pages.values()) + snap.scratch_pages
        assert self.checker.multiply_mapped_chunks() <= self.pool.scratch_handles(), "a page other than the scratch's is mapped twice"
        assert self.checker.num_created_pages == snap.pages_mapped + snap.pages_reserved, "a physical page leaked"
        assert len(self.checker.chunks) == snap.num_chunks, "a chunk leaked"
        assert set(self.checker.accessible) == set(self.checker.page_at), "a mapped page was left inaccessible"


def make_rig(
    page_bytes: int = 16 * 1024, budget_pages: int = 32, reserve_pages: int = 4, chunk_pages: int = 4
) -> PoolRig:
    """A pool of `budget_pages` pages in chunks of `chunk_pages` (1: every page its own chunk)."""
    checker = CheckingBackend(HostBackend(page_bytes))
    faults = FaultInjectingBackend(checker)
    return PoolRig(PagePool(faults, budget_pages * page_bytes, reserve_pages, chunk_pages), checker, faults)
