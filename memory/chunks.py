"""Physical memory in chunks: the pool's inventory of physical allocations, by size, free or in use.

A chunk is one physical allocation of 1 to `chunk_pages` pages (a whole chunk: 32 pages of 2 MiB =
64 MiB by default); a physical page is (chunk, index in the chunk). The driver's cost is per call, not per
byte: on the lent H100 one cuMemMap + cuMemSetAccess of a 2 MiB page costs ~33 µs, of a whole 64 MiB
chunk ~42 µs (benchmarks/vmm_map.py). But the driver maps only whole allocations: cuMemMap of part of
one (a non-zero offset, or a size short of the allocation) fails with CUDA_ERROR_NOT_SUPPORTED on the
lent H100 (driver 580, CUDA 13), whatever the documentation says. So a chunk is always mapped whole, at
n consecutive virtual pages, with one call: a whole aligned group of weights is one whole chunk, a KV
page is a one-page chunk, and the tail of a model's weights is a chunk of exactly its size.

Chunks of one size serve only runs of that size, so the pool changes sizes by destroying free chunks and
creating others (memory/pool.py decides when); this class only keeps the books: which chunks exist and
which are free, indexed by size. No backend calls; not thread-safe on its own (the pool's lock guards it).
"""

from __future__ import annotations

from typing import Any


class PhysicalChunk:
    """One physical allocation of `num_pages` pages, mapped whole or not at all.

    `pages[i]` is the physical page (self, i), made once: a range's `handles` point at these tuples, so
    mapping allocates nothing that the cyclic garbage collector must track (allocations per map made
    full collections, which scan every object of a process holding torch, cost ~9 µs a page).
    """

    __slots__ = ("handle", "num_pages", "pages", "free")

    def __init__(self, handle: Any, num_pages: int):
        self.handle = handle
        self.num_pages = num_pages
        self.pages: tuple[PhysicalPage, ...] = tuple((self, i) for i in range(num_pages))
        self.free = True

    def __repr__(self) -> str:
        return f"PhysicalChunk({self.handle!r}, {self.num_pages} pages, {'free' if self.free else 'in use'})"


# A physical page: (chunk, index of the page in the chunk).
PhysicalPage = tuple[PhysicalChunk, int]


class ChunkSet:
    """The pool's chunks: how many pages exist and are free, and the free chunks of each size."""

    def __init__(self, chunk_pages: int):
        if chunk_pages < 1:
            raise ValueError(f"chunk_pages must be >= 1, not {chunk_pages}")
        self.chunk_pages = chunk_pages
        self.num_pages = 0  # created: in use + free
        self.num_free = 0  # pages of free chunks: the pool's reserve
        self.num_chunks = 0
        # _free[n]: free chunks of n pages. Dicts for a deterministic order; taken with popitem, since
        # CPython leaves deleted entries in place and taking from the front would scan ever more of them.
        self._free: list[dict[PhysicalChunk, None]] = [{} for _ in range(chunk_pages + 1)]

    # --- counts ---------------------------------------------------------------------------------

    @property
    def num_free_chunks(self) -> int:
        """Free whole chunks: each backs one aligned group of weights with one call."""
        return len(self._free[self.chunk_pages])

    def num_free_of_size(self, num_pages: int) -> int:
        return len(self._free[num_pages])

    def free_chunks(self) -> list[PhysicalChunk]:
        """Every free chunk, largest first (the order in which trimming destroys them)."""
        return [chunk for bucket in reversed(self._free) for chunk in bucket]

    # --- chunks come and go -----------------------------------------------------------------------

    def add(self, chunk: PhysicalChunk, free: bool) -> None:
        """A newly created chunk, free or about to be mapped."""
        assert 1 <= chunk.num_pages <= self.chunk_pages
        self.num_pages += chunk.num_pages
        self.num_chunks += 1
        chunk.free = False
        if free:
            self.put(chunk)

    def remove(self, chunk: PhysicalChunk) -> None:
        """A free chunk that the pool has destroyed."""
        assert chunk.free, "only a free chunk can be removed"
        del self._free[chunk.num_pages][chunk]
        chunk.free = False
        self.num_pages -= chunk.num_pages
        self.num_free -= chunk.num_pages
        self.num_chunks -= 1

    # --- chunks are taken and given back ---------------------------------------------------------

    def take(self, num_pages: int) -> PhysicalChunk | None:
        """A free chunk of exactly `num_pages` pages, now in use; None if there is none."""
        bucket = self._free[num_pages]
        if not bucket:
            return None
        chunk, _ = bucket.popitem()
        chunk.free = False
        self.num_free -= num_pages
        return chunk

    def put(self, chunk: PhysicalChunk) -> None:
        """A chunk no longer mapped anywhere."""
        assert not chunk.free, f"{chunk} is already free"
        chunk.free = True
        self._free[chunk.num_pages][chunk] = None
        self.num_free += chunk.num_pages

    def victims(self, num_pages: int, keep_size: int) -> list[PhysicalChunk]:
        """Free chunks to destroy so that `num_pages` more pages can be created, or [] if too few are free.

        Whole chunks go last (they are what weights need); among the others the largest go first, so that
        the fewest calls make the room. Chunks of `keep_size` pages are not taken (the caller wants one).
        """
        chosen: list[PhysicalChunk] = []
        freed = 0
        sizes = [*range(self.chunk_pages - 1, 0, -1), self.chunk_pages]
        for size in sizes:
            if size == keep_size:
                continue
            for chunk in self._free[size]:
                if freed >= num_pages:
                    return chosen
                chosen.append(chunk)
                freed += size
        return chosen if freed >= num_pages else []

    # --- checks ---------------------------------------------------------------------------------

    def audit(self, in_use: dict[PhysicalChunk, int]) -> None:
        """Assert the books against `in_use`: every mapped chunk -> how many of its pages are mapped."""
        free = [chunk for bucket in self._free for chunk in bucket]
        assert len(set(free)) == len(free), "a chunk is filed twice"
        assert not set(free) & set(in_use), "a free chunk is mapped"
        for size, bucket in enumerate(self._free):
            assert all(c.free and c.num_pages == size for c in bucket), f"a chunk is misfiled under {size} pages"
        for chunk, num_mapped in in_use.items():
            assert not chunk.free and num_mapped == chunk.num_pages, f"{chunk} is mapped in part ({num_mapped} pages)"
        assert self.num_free == sum(c.num_pages for c in free), "free page count is stale"
        assert self.num_pages == self.num_free + sum(c.num_pages for c in in_use), "created page count is stale"
        assert self.num_chunks == len(free) + len(in_use), "chunk count is stale"
