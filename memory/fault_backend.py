"""FaultInjectingBackend: wraps any backend and makes a chosen call fail, for roll-back tests.

`fail_at("map", 3)` makes the third `map` call from now raise BackendError before it reaches the inner
backend (so the inner backend never sees a half-done call, as with a driver that refuses a call); every
other call passes through. Faults fire once; `calls` counts every call that reached the wrapper.

`map` covers single pages and runs alike; `fail_at("map", 1, min_pages=2)` counts only the calls that map
two pages or more, so that a test can fail exactly the run-map of a whole chunk.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from memory.backend import BackendError, PageBackend

OPERATIONS = ("reserve", "release", "create_chunk", "destroy_chunk", "map", "set_access", "synchronize", "unmap")


class FaultInjectingBackend:
    def __init__(self, inner: PageBackend):
        self.inner = inner
        self.device = inner.device
        self.page_bytes = inner.page_bytes
        self.calls: Counter[str] = Counter()
        self._fail_on_call: dict[str, int] = {}  # operation -> the call number (in `calls`) that fails
        self._run_map_fault: int | None = None  # run-maps still to come before the armed one fails
        self._run_min_pages = 2

    def fail_at(self, operation: str, nth: int = 1, min_pages: int = 1) -> None:
        """Make the `nth` call of `operation` from now (1 = the next one) raise BackendError, once.

        With `min_pages` > 1 (`map` only), only map calls of at least that many pages are counted.
        """
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {OPERATIONS}")
        if nth < 1 or min_pages < 1 or (min_pages > 1 and operation != "map"):
            raise ValueError(f"nth and min_pages count from 1 (min_pages only for map), not {nth}, {min_pages}")
        if min_pages > 1:
            self._run_map_fault, self._run_min_pages = nth, min_pages
        else:
            self._fail_on_call[operation] = self.calls[operation] + nth

    def clear_faults(self) -> None:
        self._fail_on_call.clear()
        self._run_map_fault = None

    @property
    def pending_faults(self) -> dict[str, int]:
        """Armed faults that have not fired: operation -> calls still to come before it fires (1 = next).

        An armed run-map fault is listed as "map_run".
        """
        pending = {op: n - self.calls[op] for op, n in self._fail_on_call.items()}
        if self._run_map_fault is not None:
            pending["map_run"] = self._run_map_fault
        return pending

    # --- PageBackend ----------------------------------------------------------------------------

    def reserve(self, num_bytes: int) -> int:
        self._enter("reserve")
        return self.inner.reserve(num_bytes)

    def release(self, base: int, num_bytes: int) -> None:
        self._enter("release")
        self.inner.release(base, num_bytes)

    def create_chunk(self, num_bytes: int) -> Any:
        self._enter("create_chunk")
        return self.inner.create_chunk(num_bytes)

    def destroy_chunk(self, handle: Any) -> None:
        self._enter("destroy_chunk")
        self.inner.destroy_chunk(handle)

    def map(self, address: int, num_bytes: int, handle: Any, offset: int) -> None:
        self._enter("map")
        if self._run_map_fault is not None and num_bytes >= self._run_min_pages * self.page_bytes:
            self._run_map_fault -= 1
            if self._run_map_fault == 0:
                self._run_map_fault = None
                raise BackendError(f"injected fault: run-map of {num_bytes // self.page_bytes} pages")
        self.inner.map(address, num_bytes, handle, offset)

    def set_access(self, address: int, num_bytes: int) -> None:
        self._enter("set_access")
        self.inner.set_access(address, num_bytes)

    def synchronize(self) -> None:
        self._enter("synchronize")
        self.inner.synchronize()

    def unmap(self, address: int, num_bytes: int) -> None:
        self._enter("unmap")
        self.inner.unmap(address, num_bytes)

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        return self.inner.tensor(base, num_bytes)

    # --- internals ------------------------------------------------------------------------------

    def _enter(self, operation: str) -> None:
        self.calls[operation] += 1
        if self._fail_on_call.get(operation) == self.calls[operation]:
            del self._fail_on_call[operation]
            raise BackendError(f"injected fault: {operation} call {self.calls[operation]}")
