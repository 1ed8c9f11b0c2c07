"""WeightSpace (a test helper): weights of a made-up model in pool pages, mapped up front, given back whole.

The engine maps its weights through the same pool calls (`reserve_range`, `map_pages`); the pool's tests
and benchmarks/pool.py use this to put weight pages beside KV pages.

Activation reserves one WEIGHTS range, maps all of its pages in one pool call (all or nothing; the pool
maps each aligned group of a chunk's worth of pages with one driver call), and the loader places each
parameter with `allocate(shape, dtype)`, a bump allocator over the range; eviction is `close()`, after
which the pages serve other models' KV at once. Weights are never freed one by one, so a
bump allocator is all that is needed, and it leaves no holes.

Offsets are aligned to 256 bytes: what the caching allocator guarantees (cudaMalloc's alignment), so
kernels that assume aligned parameters (vectorised loads, TMA) behave as with `torch.empty`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from memory.pool import MemoryKind, PagePool

WEIGHT_ALIGNMENT_BYTES = 256


class PoolExhaustedError(MemoryError):
    """The pool's budget cannot back this model's weights now; nothing was mapped.

    Who acts: the caller (the worker's activation path) evicts idle models or waits for KV to drain,
    then retries, or reports the activation as failed for lack of memory.
    """


def weight_bytes_needed(parameters: Iterable[tuple[Sequence[int], torch.dtype]]) -> int:
    """Bytes a WeightSpace needs to hold these (shape, dtype) parameters, allocated in this order."""
    offset = 0
    for shape, dtype in parameters:
        offset = _align(offset) + _tensor_bytes(shape, dtype)
    return offset


class WeightSpace:
    def __init__(self, pool: PagePool, owner: str, num_bytes: int):
        if num_bytes <= 0:
            raise ValueError(f"a weight space needs a positive size, not {num_bytes}")
        self.pool = pool
        self.owner = owner
        self.num_bytes = num_bytes
        self.vrange = pool.reserve_range(owner, MemoryKind.WEIGHTS, num_bytes)
        try:
            mapped = pool.map_pages(self.vrange, range(self.vrange.num_pages))
        except BaseException:
            pool.release_range(self.vrange)
            raise
        if not mapped:
            pool.release_range(self.vrange)
            raise PoolExhaustedError(
                f"weights of {owner} need {self.vrange.num_pages} pages of {pool.page_bytes} bytes; "
                f"the pool has {pool.num_free_pages} free of a budget of {pool.budget_pages}"
            )
        self._raw: torch.Tensor | None = pool.tensor(self.vrange)
        self._offset = 0

    @property
    def num_bytes_used(self) -> int:
        return self._offset

    @property
    def num_pages(self) -> int:
        return self.vrange.num_pages

    @property
    def closed(self) -> bool:
        return self._raw is None

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` in the next aligned bytes of the space (uninitialised)."""
        if self._raw is None:
            raise ValueError(f"weight space of {self.owner} is closed")
        start = _align(self._offset)
        end = start + _tensor_bytes(shape, dtype)
        if end > self.num_bytes:
            raise ValueError(
                f"weight space of {self.owner} is full: {tuple(shape)} {dtype} needs bytes up to {end}, "
                f"the space has {self.num_bytes} (size it with weight_bytes_needed)"
            )
        self._offset = end
        return self._raw[start:end].view(dtype).view(tuple(shape))

    def close(self) -> None:
        """Unmap and release everything (evicting the model); tensors from `allocate` must be dropped first.

        Closing twice is a no-op.
        """
        if self._raw is None:
            return
        self._raw = None
        self.pool.release_range(self.vrange)


def _align(offset: int) -> int:
    return -(-offset // WEIGHT_ALIGNMENT_BYTES) * WEIGHT_ALIGNMENT_BYTES


def _tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {tuple(shape)}")
    return math.prod(shape) * dtype.itemsize
