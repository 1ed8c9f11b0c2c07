"""CUDA VMM backend: physical chunks from cuMemCreate, mapped whole into cuMemAddressReserve ranges.

This is what lets co-located models share a GPU at page granularity (kvcached's idea): address space is
reserved per model up front and costs nothing; physical memory is created in chunks of one or more 2 MiB
pages, mapped, unmapped and reused between models at run time. Every driver call's CUresult is checked
and a failure raises BackendError naming the call and the error (e.g. "cuMemCreate failed:
CUDA_ERROR_OUT_OF_MEMORY").

Driver calls run with the device's primary context pushed current (the context torch uses), so they work
from any thread and never change which device torch thinks is current. `cuda.bindings` is imported when a
backend is built, so importing `memory` needs no CUDA.

Measured on the lent H100 (benchmarks/pool.py, benchmarks/vmm_map.py): the cost is per call, not per
byte. cuMemMap + cuMemSetAccess of one 2 MiB page ~33 µs, of a 64 MiB chunk ~42 µs (1.3 µs per 2 MiB);
cuMemCreate 16-17 µs, cuMemUnmap 20-25 µs, cuMemRelease 17-22 µs per 2 MiB page. cuMemMap of part of an
allocation fails with CUDA_ERROR_NOT_SUPPORTED there (driver 580.159, CUDA 13; tests/memory/
test_cuda_backend.py pins it) and cuMemUnmap of part of a mapping with CUDA_ERROR_INVALID_VALUE: the pool
maps and unmaps chunks whole.

torch.as_tensor accepts a view over a range whose pages are not mapped yet (checked on torch 2.11 by
tests/memory/test_cuda_backend.py), so a KV space's tensor can be taken once, before its first block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memory.backend import BackendError

DEFAULT_PAGE_BYTES = 2 * 1024 * 1024


def _import_driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as error:
        raise ImportError("the CUDA page backend needs cuda-python: pip install 'prism-serve[gpu]'") from error
    return driver


class _DeviceBytes:
    """Exposes [base, base + num_bytes) of device memory through __cuda_array_interface__ (version 2).

    No 'stream' key: the memory is ours, with no producer stream to wait for.
    """

    def __init__(self, base: int, num_bytes: int):
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (base, False),
            "strides": None,
            "version": 2,
        }


class CudaBackend:
    """Pinned device memory in chunks of whole pages of `page_bytes` (a multiple of the driver's granularity,
    2 MiB on H100)."""

    def __init__(self, device: str | torch.device = "cuda", page_bytes: int = DEFAULT_PAGE_BYTES):
        self._cu = _import_driver()
        self._success = self._cu.CUresult.CUDA_SUCCESS
        torch_device = torch.device(device)
        if torch_device.type != "cuda":
            raise ValueError(f"CudaBackend needs a CUDA device, not {device!r}")
        if not torch.cuda.is_available():
            raise BackendError("no CUDA device is visible to this process")
        torch.cuda.init()
        ordinal = torch.cuda.current_device() if torch_device.index is None else torch_device.index
        if not 0 <= ordinal < torch.cuda.device_count():
            raise ValueError(f"{device!r}: this process sees {torch.cuda.device_count()} CUDA devices")
        self.ordinal = ordinal
        self.device = f"cuda:{ordinal}"
        cu = self._cu
        self._call("cuInit", cu.cuInit(0))
        cu_device = self._call("cuDeviceGet", cu.cuDeviceGet(ordinal))
        self._cu_device = cu_device
        self._context = self._call("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(cu_device))
        self._allocation = self._allocation_prop(ordinal)
        self._access = [self._access_desc(ordinal)]
        granularity_flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        granularity = self._driver(
            "cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity, self._allocation, granularity_flag
        )
        self.granularity_bytes = int(granularity)
        if page_bytes <= 0 or page_bytes % self.granularity_bytes:
            self.close()
            raise ValueError(f"page_bytes {page_bytes} is not a multiple of the granularity {self.granularity_bytes}")
        self.page_bytes = page_bytes

    # --- PageBackend ----------------------------------------------------------------------------

    def reserve(self, num_bytes: int) -> int:
        return int(self._driver("cuMemAddressReserve", self._cu.cuMemAddressReserve, num_bytes, self.page_bytes, 0, 0))

    def release(self, base: int, num_bytes: int) -> None:
        self._driver("cuMemAddressFree", self._cu.cuMemAddressFree, base, num_bytes)

    def create_chunk(self, num_bytes: int) -> Any:
        return self._driver("cuMemCreate", self._cu.cuMemCreate, num_bytes, self._allocation, 0)

    def destroy_chunk(self, handle: Any) -> None:
        self._driver("cuMemRelease", self._cu.cuMemRelease, handle)

    def map(self, address: int, num_bytes: int, handle: Any, offset: int) -> None:
        self._driver("cuMemMap", self._cu.cuMemMap, address, num_bytes, offset, handle, 0)

    def set_access(self, address: int, num_bytes: int) -> None:
        self._driver("cuMemSetAccess", self._cu.cuMemSetAccess, address, num_bytes, self._access, 1)

    def synchronize(self) -> None:
        self._driver("cuCtxSynchronize", self._cu.cuCtxSynchronize)

    def unmap(self, address: int, num_bytes: int) -> None:
        self._driver("cuMemUnmap", self._cu.cuMemUnmap, address, num_bytes)

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        return torch.as_tensor(_DeviceBytes(base, num_bytes), device=self.device)

    # --- host memory ----------------------------------------------------------------------------

    def pin_host(self, tensor: torch.Tensor) -> None:
        """Page-lock a CPU tensor's memory in place (cuMemHostRegister), for copies at PCIe line rate.

        For memory torch did not allocate pinned, e.g. the host weight store's shared memory; pageable
        copies run at a fraction of the speed (3.3 vs 54.8 GB/s on the lent H100). Undo with `unpin_host`
        before the memory is freed.
        """
        self._check_host_tensor(tensor)
        flags = self._cu.CU_MEMHOSTREGISTER_PORTABLE  # pinned for every context, not just ours
        self._driver("cuMemHostRegister", self._cu.cuMemHostRegister, tensor.data_ptr(), tensor.nbytes, flags)

    def unpin_host(self, tensor: torch.Tensor) -> None:
        self._check_host_tensor(tensor)
        self._driver("cuMemHostUnregister", self._cu.cuMemHostUnregister, tensor.data_ptr())

    # --- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop this backend's hold on the primary context (pages and ranges must be gone by then)."""
        if self._context is not None:
            self._context = None
            self._call("cuDevicePrimaryCtxRelease", self._cu.cuDevicePrimaryCtxRelease(self._cu_device))

    # --- internals ------------------------------------------------------------------------------

    def _driver(self, name: str, function: Callable[..., tuple], *args: Any) -> Any:
        """Call a driver function with the primary context current; return its value, if it has one.

        Plain push/call/pop rather than a context manager: this is the pool's hot path (a few µs saved
        per call when single KV pages are mapped).
        """
        context = self._context
        if context is None:
            raise ValueError(f"CudaBackend of {self.device} is closed")
        cu = self._cu
        self._call("cuCtxPushCurrent", cu.cuCtxPushCurrent(context))
        try:
            return self._call(name, function(*args))
        finally:
            self._call("cuCtxPopCurrent", cu.cuCtxPopCurrent())

    def _call(self, name: str, result: tuple) -> Any:
        """Check a cuda.bindings result tuple (CUresult, *values); return the value, if there is one."""
        error = result[0]
        if error != self._success:
            _, error_name = self._cu.cuGetErrorName(error)
            label = error_name.decode() if isinstance(error_name, bytes) else str(error)
            raise BackendError(f"{name} failed on {getattr(self, 'device', 'cuda')}: {label}")
        return result[1] if len(result) > 1 else None

    def _allocation_prop(self, ordinal: int) -> Any:
        cu = self._cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        return prop

    def _access_desc(self, ordinal: int) -> Any:
        cu = self._cu
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = ordinal
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        return access

    @staticmethod
    def _check_host_tensor(tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.nbytes == 0:
            raise ValueError("only a non-empty, contiguous CPU tensor can be pinned")
