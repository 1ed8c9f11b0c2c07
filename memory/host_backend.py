"""Host backend: anonymous mmap reservations, pages mapped with mprotect and given back with madvise.

A reservation starts as PROT_NONE address space with no physical backing (MAP_NORESERVE). Making a run of
pages accessible makes it readable and writable (the kernel backs each page on first touch); unmapping a
page drops its contents with MADV_DONTNEED, so the process's resident memory really falls, and makes it
PROT_NONE again, so a stray access to an unmapped page faults just as it would on a GPU. A remapped page
reads as zeros (private anonymous memory), unlike a GPU page, which keeps whatever its last user wrote.

Chunks are bookkeeping only here: a chunk handle stands for `num_bytes` of the budget, and mapping it
does nothing until `set_access`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np
import torch

from memory.backend import BackendError

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = getattr(mmap, "PROT_NONE", 0)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise BackendError(f"{what} failed: {os.strerror(errno)} (errno {errno})")


class HostBackend:
    """Pages of host memory; `page_bytes` must be a multiple of the OS page size."""

    def __init__(self, page_bytes: int = 2 * 1024 * 1024):
        if page_bytes <= 0 or page_bytes % mmap.PAGESIZE:
            raise ValueError(f"page_bytes {page_bytes} is not a positive multiple of the OS page size {mmap.PAGESIZE}")
        self.device = "cpu"
        self.page_bytes = page_bytes
        self._next_handle = 0

    def reserve(self, num_bytes: int) -> int:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        base = _libc.mmap(None, num_bytes, _PROT_NONE, flags, -1, 0)
        if base in (None, _MAP_FAILED):
            errno = ctypes.get_errno()
            raise BackendError(f"mmap of {num_bytes} bytes failed: {os.strerror(errno)}")
        return base

    def release(self, base: int, num_bytes: int) -> None:
        _check(_libc.munmap(base, num_bytes), "munmap")

    def create_chunk(self, num_bytes: int) -> int:
        # Host memory is backed on first touch; a handle only stands for its share of the budget.
        self._next_handle += 1
        return self._next_handle

    def destroy_chunk(self, handle: int) -> None:
        return None

    def map(self, address: int, num_bytes: int, handle: int, offset: int) -> None:
        return None  # the kernel backs the pages on first touch once set_access allows it

    def set_access(self, address: int, num_bytes: int) -> None:
        _check(_libc.mprotect(address, num_bytes, mmap.PROT_READ | mmap.PROT_WRITE), "mprotect")

    def synchronize(self) -> None:
        return None  # CPU work is synchronous

    def unmap(self, address: int, num_bytes: int) -> None:
        _check(_libc.madvise(address, num_bytes, _MADV_DONTNEED), "madvise(MADV_DONTNEED)")
        _check(_libc.mprotect(address, num_bytes, _PROT_NONE), "mprotect")

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        array = np.ctypeslib.as_array((ctypes.c_uint8 * num_bytes).from_address(base))
        return torch.from_numpy(array)
