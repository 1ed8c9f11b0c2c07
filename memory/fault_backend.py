"""FaultInjectingBackend: wraps any backend and makes a chosen call fail, for roll-back tests.

`fail_at("map", 3)` makes the third `map` call from now raise BackendError before it reaches the inner
backend (so the inner backend never sees a half-done call, as with a driver that refuses a call); every
other call passes through. Faults fire once; `calls` counts every call that reached the wrapper.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from memory.backend import BackendError, PageBackend

OPERATIONS = ("reserve", "release", "create_page", "destroy_page", "map", "set_access", "synchronize", "unmap")


class FaultInjectingBackend:
    def __init__(self, inner: PageBackend):
        self.inner = inner
        self.device = inner.device
        self.page_bytes = inner.page_bytes
        self.calls: Counter[str] = Counter()
        self._fail_on_call: dict[str, int] = {}  # operation -> the call number (in `calls`) that fails

    def fail_at(self, operation: str, nth: int = 1) -> None:
        """Make the `nth` call of `operation` from now (1 = the next one) raise BackendError, once."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {OPERATIONS}")
        if nth < 1:
            raise ValueError(f"nth counts from 1, not {nth}")
        self._fail_on_call[operation] = self.calls[operation] + nth

    def clear_faults(self) -> None:
        self._fail_on_call.clear()

    @property
    def pending_faults(self) -> dict[str, int]:
        """Armed faults that have not fired: operation -> calls still to come before it fires (1 = next)."""
        return {op: n - self.calls[op] for op, n in self._fail_on_call.items()}

    # --- PageBackend ----------------------------------------------------------------------------

    def reserve(self, num_bytes: int) -> int:
        self._enter("reserve")
        return self.inner.reserve(num_bytes)

    def release(self, base: int, num_bytes: int) -> None:
        self._enter("release")
        self.inner.release(base, num_bytes)

    def create_page(self) -> Any:
        self._enter("create_page")
        return self.inner.create_page()

    def destroy_page(self, handle: Any) -> None:
        self._enter("destroy_page")
        self.inner.destroy_page(handle)

    def map(self, address: int, handle: Any) -> None:
        self._enter("map")
        self.inner.map(address, handle)

    def set_access(self, address: int, num_bytes: int) -> None:
        self._enter("set_access")
        self.inner.set_access(address, num_bytes)

    def synchronize(self) -> None:
        self._enter("synchronize")
        self.inner.synchronize()

    def unmap(self, address: int) -> None:
        self._enter("unmap")
        self.inner.unmap(address)

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        return self.inner.tensor(base, num_bytes)

    # --- internals ------------------------------------------------------------------------------

    def _enter(self, operation: str) -> None:
        self.calls[operation] += 1
        if self._fail_on_call.get(operation) == self.calls[operation]:
            del self._fail_on_call[operation]
            raise BackendError(f"injected fault: {operation} call {self.calls[operation]}")
