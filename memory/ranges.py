"""The page pool's data types: memory kinds, virtual ranges, snapshots (memory/pool.py changes them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from memory.chunks import PhysicalPage


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
    """A reservation of address space for one owner.

    `handles[i]` is the physical page at page i, (chunk, index in chunk), or None; page i belongs to the
    mapping that starts at page i - index and covers the whole chunk. Only the pool changes `handles` and
    `num_mapped`; clients read them.
    """

    owner: str
    kind: MemoryKind
    base: int
    num_pages: int
    page_bytes: int
    handles: list[PhysicalPage | None] = field(repr=False)
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
    chunk_pages: int = 1
    num_chunks: int = 0  # physical allocations alive, any size
    num_free_chunks: int = 0  # free whole chunks: what weights map fastest into
    scratch_pages: int = 0  # the capture scratch's pages, while a range holds it (in pages_mapped, under no owner)
    ranges_reserved: int = 0  # live virtual ranges
    va_bytes_reserved: int = 0  # their address space, mapped or not

    @property
    def pages_free(self) -> int:
        return max(0, self.budget_pages - self.pages_mapped)

    @property
    def pages_over_budget(self) -> int:
        """Mapped pages beyond the budget after a shrink; clients must unmap this many."""
        return max(0, self.pages_mapped - self.budget_pages)
