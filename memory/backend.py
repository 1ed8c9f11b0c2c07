"""The narrow interface every physical-memory backend implements (host, CUDA VMM, fault-injecting fake)."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class BackendError(RuntimeError):
    """The OS or driver refused a memory operation. The pool rolls back; the caller sees no partial state."""


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
        """Map a physical page at a page-aligned address inside a reservation, readable and writable."""

    def unmap(self, address: int) -> None:
        """Unmap the page at `address`; its physical page stays alive until destroyed."""

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        """A uint8 tensor viewing [base, base + num_bytes) of a reservation (no copy)."""
