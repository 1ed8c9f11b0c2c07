"""The narrow interface every physical-memory backend implements (host, CUDA VMM, fault-injecting fake).

Mapping is two-phase, as in PyTorch's expandable segments: `map` backs each page with a physical page,
then one `set_access` makes a whole contiguous run usable (one call per run instead of per page; on the
H100 the driver's cost is still mostly per page: about 30 vs 36 us a page). Only the pool calls a backend; it
rolls back whatever a failed sequence of calls left behind, so a backend never has to.
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

    def create_page(self) -> Any:
        """Create one physical page; return its handle."""

    def destroy_page(self, handle: Any) -> None:
        """Free one physical page that is mapped nowhere."""

    def map(self, address: int, handle: Any) -> None:
        """Back the page at a page-aligned `address` inside a reservation with a physical page.

        The page is not usable until `set_access` covers it.
        """

    def set_access(self, address: int, num_bytes: int) -> None:
        """Make the mapped pages of [address, address + num_bytes) readable and writable by the device."""

    def synchronize(self) -> None:
        """Wait until device work that may still read or write mapped pages has finished.

        The pool calls it once before a batch of unmaps: unmapping under a running kernel is undefined
        behaviour on a GPU (the driver does not wait), and a page unmapped from one model may be mapped
        into another right after.
        """

    def unmap(self, address: int) -> None:
        """Unmap the page at `address`; its physical page stays alive until destroyed."""

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        """A uint8 tensor viewing [base, base + num_bytes) of a reservation (no copy)."""
