"""Host image to device copies: the pinned pieces by DMA, the rest through the bounce buffers."""

from __future__ import annotations

import pytest

MIB = 2**20
SIZE = 43 * MIB + 123


@pytest.mark.gpu
@pytest.mark.parametrize("pieces", [[], [8 * MIB, 8 * MIB], [8 * MIB] * 5 + [3 * MIB + 123]], ids=["unpinned", "partly", "whole"])
def test_gpu_a_partly_pinned_image_arrives_whole(monkeypatch, pieces):
    """Each piece is registered apart, as HostImage.pin does; copies of 3 MiB would span two 8 MiB pieces if
    they were not cut at the pieces' ends (the driver refuses such a copy)."""
    import torch

    from memory.cuda_backend import CudaBackend
    from workers.engine import host_copy

    monkeypatch.setattr(host_copy, "BOUNCE_BYTES", MIB)  # more pieces than buffers: the ring is reused
    source = torch.randint(0, 256, (SIZE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(len(pieces)))
    target = torch.zeros_like(source, device="cuda:0")
    backend = CudaBackend("cuda:0")
    starts = [sum(pieces[:i]) for i in range(len(pieces))]
    for start, size in zip(starts, pieces):
        backend.pin_host(source[start : start + size])
    try:
        host_copy.HostToDevice(torch.device("cuda:0")).copy(source, pieces, target, chunk_bytes=3 * MIB)
        assert torch.equal(target.cpu(), source)
    finally:
        for start, size in zip(starts, pieces):
            backend.unpin_host(source[start : start + size])
        backend.close()
