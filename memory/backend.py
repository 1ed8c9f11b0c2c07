"""The narrow interface every physical-memory backend implements (host, CUDA VMM, fault-injecting fake).

Physical memory comes in chunks (one allocation of one or more pages); the pool maps a chunk whole at a
page-aligned virtual address with one `map` call, then one `set_access` makes a whole contiguous virtual
run usable, as in PyTorch's expandable segments. The driver's cost is per call, not per page: on the lent
H100 one cuMemMap + cuMemSetAccess costs ~33 µs for a 2 MiB page alone and ~42 µs for a whole 64 MiB
chunk (benchmarks/vmm_map.py).

Whole chunks only, both ways: cuMemMap of part of an allocation fails with CUDA_ERROR_NOT_SUPPORTED on
the lent H100 (driver 580), although the documentation allows an offset; and cuMemUnmap must be given the
entire range that one cuMemMap mapped ("cuMemUnmap cannot unmap a sub-range of an address range mapped by
cuMemCreate / cuMemMap"; part of one gives CUDA_ERROR_INVALID_VALUE there). benchmarks/vmm_map.py
records both. The `offset` argument mirrors cuMemMap's; the pool always passes 0 and the whole chunk. Only the pool calls a backend; it rolls back whatever a failed
sequence of calls left behind, so a backend never has to.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class BackendError(RuntimeError):
    """The OS or driver refused a memory operation. The pool rolls back; the caller sees no partial state.

    Who acts: the caller treats it as a device fault (log, fail the activation or the step); retrying the
    same call rarely helps, because the budget already guards against ordinary shortage.
    """


class PageBackend(Protocol):
    device: str
    page_bytes: int

    def reserve(self, num_bytes: int) -> int:
        """Reserve `num_bytes` (a multiple of page_bytes) of virtual address space; return its base."""

    def release(self, base: int, num_bytes: int) -> None:
        """Give back a reservation; every page in it must be unmapped first."""

    def create_chunk(self, num_bytes: int) -> Any:
        """Create one physical allocation of `num_bytes` (a multiple of page_bytes); return its handle."""

    def destroy_chunk(self, handle: Any) -> None:
        """Free a physical allocation no page of which is mapped anywhere."""

    def map(self, address: int, num_bytes: int, handle: Any, offset: int) -> None:
        """Back [address, address + num_bytes) with bytes [offset, offset + num_bytes) of chunk `handle`.

        `address` lies in a reservation; all three numbers are multiples of page_bytes (the pool maps whole
        chunks: offset 0, num_bytes the chunk's size). The pages are not usable until `set_access` covers
        them.
        """

    def set_access(self, address: int, num_bytes: int) -> None:
        """Make the mapped pages of [address, address + num_bytes) readable and writable by the device.

        The range may span several mappings.
        """

    def synchronize(self) -> None:
        """Wait until device work that may still read or write mapped pages has finished.

        The pool calls it once before a batch of unmaps: unmapping under a running kernel is undefined
        behaviour on a GPU (the driver does not wait), and a page unmapped from one model may be mapped
        into another right after.
        """

    def unmap(self, address: int, num_bytes: int) -> None:
        """Undo exactly one `map` call made with this address and size; the chunk stays alive."""

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        """A uint8 tensor viewing [base, base + num_bytes) of a reservation (no copy)."""
