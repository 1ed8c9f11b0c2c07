"""Elastic page pool of a device: physical pages mapped into per-model virtual ranges (kvcached idea).

`PagePool` owns a device's memory budget for models, in pages backed by physical chunks (memory/chunks.py);
`KVSpace` packs a model's KV blocks into pool pages; a model's weights live in a WEIGHTS range of the pool
(the engine maps it at activation and unmaps it at eviction).
Backends: host (mmap + mprotect + madvise), CUDA VMM (cuda.bindings.driver, imported only when a
CudaBackend is built), and a fault-injecting wrapper for tests.
"""

from memory.backend import BackendError, PageBackend
from memory.chunks import PhysicalChunk
from memory.cuda_backend import CudaBackend
from memory.fault_backend import FaultInjectingBackend
from memory.host_backend import HostBackend
from memory.kv_space import CappedKV, KVSpace
from memory.pool import DEFAULT_CHUNK_PAGES, MemoryKind, PagePool, PoolSnapshot, VirtualRange

__all__ = [
    "BackendError",
    "CappedKV",
    "CudaBackend",
    "DEFAULT_CHUNK_PAGES",
    "FaultInjectingBackend",
    "HostBackend",
    "KVSpace",
    "MemoryKind",
    "PageBackend",
    "PagePool",
    "PhysicalChunk",
    "PoolSnapshot",
    "VirtualRange",
]
