"""Elastic page pool of a device: physical pages mapped into per-model virtual ranges (kvcached idea).

`PagePool` owns a device's memory budget for models; `KVSpace` packs a model's KV blocks into pool pages.
Backends: host (mmap + mprotect + madvise), CUDA VMM (cuda.bindings.driver), and a fault-injecting fake.
"""

from memory.backend import PageBackend
from memory.host_backend import HostBackend
from memory.kv_space import KVSpace
from memory.pool import MemoryKind, PagePool, VirtualRange

__all__ = ["HostBackend", "KVSpace", "MemoryKind", "PageBackend", "PagePool", "VirtualRange"]
