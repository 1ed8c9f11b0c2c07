"""Host image to device copies: the pinned part by DMA, the rest through the bounce buffers."""

from __future__ import annotations

import pytest

MIB = 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("pinned_mib", [0, 16, 43])
def test_gpu_a_partly_pinned_image_arrives_whole(monkeypatch, pinned_mib):
    import torch

    from memory.cuda_backend import CudaBackend
    from workers.engine import host_copy

    monkeypatch.setattr(host_copy, "BOUNCE_BYTES", MIB)  # more pieces than buffers: the ring is reused
    source = torch.randint(0, 256, (43 * MIB + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(pinned_mib))
    target = torch.zeros_like(source, device="cuda:0")
    backend = CudaBackend("cuda:0")
    pinned = source[: pinned_mib * MIB]
    if pinned_mib:
        backend.pin_host(pinned)
    try:
        host_copy.HostToDevice(torch.device("cuda:0")).copy(source, pinned_mib * MIB, target, chunk_bytes=4 * MIB)
        assert torch.equal(target.cpu(), source)
    finally:
        if pinned_mib:
            backend.unpin_host(pinned)
        backend.close()

