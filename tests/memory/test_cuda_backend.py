"""CUDA VMM backend on a real GPU: whole-chunk maps (the driver refuses part of one), views, data integrity
under a neighbour's churn, page reuse, budgets.

Run on the device machine: python -m pytest tests/memory/test_cuda_backend.py -m gpu -q
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from memory import (
    BackendError,
    CudaBackend,
    FaultInjectingBackend,
    KVSpace,
    PagePool,
)
from tests.memory.weight_space import PoolExhaustedError, WeightSpace, weight_bytes_needed

pytestmark = pytest.mark.gpu

MIB = 1024 * 1024
PAGE = 2 * MIB


@pytest.fixture
def shm_dir(tmp_path):
    """A directory in POSIX shared memory, where the host weight store keeps its images by default."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="prism-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend():
    backend = CudaBackend("cuda:0")
    yield backend
    backend.close()


def int32_blocks(space: KVSpace) -> torch.Tensor:
    return space.tensor(torch.int32, (space.block_bytes // 4,))


def test_page_size_follows_the_driver_granularity(backend):
    assert backend.page_bytes == PAGE and PAGE % backend.granularity_bytes == 0
    with pytest.raises(ValueError, match="granularity"):
        CudaBackend("cuda:0", page_bytes=backend.granularity_bytes + 4096)
    with pytest.raises(ValueError):
        CudaBackend("cpu")


def test_view_made_before_any_page_is_mapped_reads_and_writes(backend):
    pool = PagePool(backend, 16 * PAGE)
    kv = KVSpace(pool, "a", block_bytes=PAGE // 2, max_blocks=32)
    view = int32_blocks(kv)  # the engine takes its view right after building the space, with nothing mapped
    assert view.device == torch.device(backend.device) and view.shape == (32, PAGE // 8)
    block_ids = kv.allocate(5)
    for b in block_ids:
        view[b] = torch.arange(PAGE // 8, device=view.device, dtype=torch.int32) + b
    torch.cuda.synchronize()
    for b in block_ids:
        assert torch.equal(view[b].cpu(), torch.arange(PAGE // 8, dtype=torch.int32) + b)
    del view
    kv.close()
    pool.audit()


def test_kv_and_weights_stay_intact_while_another_model_maps_and_unmaps(backend):
    pool = PagePool(backend, 64 * PAGE)
    shapes = [((1024, 1024), torch.bfloat16), ((4096,), torch.float32)]
    weights = WeightSpace(pool, "steady", weight_bytes_needed(shapes))
    matrix, bias = (weights.allocate(shape, dtype) for shape, dtype in shapes)
    matrix.copy_(torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    bias.copy_(torch.linspace(-1, 1, 4096))
    expected_matrix, expected_bias = matrix.cpu(), bias.cpu()

    steady = KVSpace(pool, "steady", block_bytes=1792 * 1024, max_blocks=64)  # Llama-3.2-3B: straddles pages
    steady_view = int32_blocks(steady)
    steady_ids = steady.allocate(12)
    for b in steady_ids:
        steady_view[b].fill_(1000 + b)

    churn = KVSpace(pool, "churn", block_bytes=512 * 1024, max_blocks=256, idle_pages=0)
    churn_view = int32_blocks(churn)
    rng = random.Random(0)
    live: list[int] = []
    pages_unmapped = 0
    for step in range(150):
        if live and rng.random() < 0.5:
            victims = rng.sample(live, rng.randint(1, len(live)))
            live = [b for b in live if b not in victims]
            before = churn.num_mapped_pages
            churn.free(victims)
            pages_unmapped += before - churn.num_mapped_pages
        else:
            new = churn.allocate(rng.randint(1, 24))
            for b in new or []:
                churn_view[b].fill_(-b)
            live += new or []
        if step % 25 == 0:
            for b in live:
                assert bool((churn_view[b] == -b).all())
    torch.cuda.synchronize()
    assert pages_unmapped > 10, "the neighbour really gave pages back"
    for b in steady_ids:
        assert bool((steady_view[b] == 1000 + b).all()), f"steady KV block {b} was corrupted"
    assert torch.equal(matrix.cpu(), expected_matrix) and torch.equal(bias.cpu(), expected_bias)
    assert pool.snapshot().weight_pages == {"steady": weights.num_pages}
    pool.audit()
    del steady_view, churn_view, matrix, bias
    for space in (churn, steady, weights):
        space.close()
    assert pool.snapshot().pages_mapped == 0


def test_page_unmapped_by_one_model_is_reused_by_another(backend):
    counting = FaultInjectingBackend(backend)  # no faults armed: it only counts driver calls
    pool = PagePool(counting, 4 * PAGE, reserve_pages=4)
    first = KVSpace(pool, "first", block_bytes=PAGE, max_blocks=4, idle_pages=0)
    second = KVSpace(pool, "second", block_bytes=PAGE, max_blocks=4, idle_pages=0)
    first_ids = first.allocate(4)
    first_handles = set(first.vrange.handles)
    assert counting.calls["create_chunk"] == 4 and counting.calls["map"] == 4, "four one-page chunks"
    assert second.allocate(1) is None, "the first model holds the whole budget"
    first.free(first_ids)
    created = counting.calls["create_chunk"]
    second_ids = second.allocate(4)
    assert counting.calls["create_chunk"] == created, "no new physical page was created"
    assert set(second.vrange.handles) == first_handles, "the same physical pages moved over"
    view = int32_blocks(second)
    for b in second_ids:
        view[b].fill_(b + 1)
    torch.cuda.synchronize()
    assert [int(view[b][-1]) for b in second_ids] == [b + 1 for b in second_ids]
    del view
    second.close()
    first.close()
    pool.close()
    pool.audit()


def test_budget_exhaustion_is_an_ordinary_result(backend):
    pool = PagePool(backend, 3 * PAGE)
    vrange = pool.reserve_range("a", "kv", 8 * PAGE)
    assert not pool.map_pages(vrange, range(4))
    assert pool.map_pages(vrange, range(3))
    assert not pool.map_pages(vrange, [3])
    kv = KVSpace(pool, "b", block_bytes=PAGE, max_blocks=4)
    assert kv.allocate(1) is None
    with pytest.raises(PoolExhaustedError):
        WeightSpace(pool, "c", PAGE)
    assert pool.snapshot().pages_mapped == 3
    pool.release_range(vrange)
    assert kv.allocate(3) is not None
    kv.close()
    pool.audit()


def test_driver_errors_name_the_call_and_the_error(backend):
    base = backend.reserve(2 * PAGE)
    handle = backend.create_chunk(PAGE)
    try:
        with pytest.raises(BackendError, match=r"cuMemMap failed on cuda:0: CUDA_ERROR_\w+"):
            backend.map(base + 4096, PAGE, handle, 0)  # not aligned to the granularity
    finally:
        backend.destroy_chunk(handle)
        backend.release(base, 2 * PAGE)


def test_the_driver_maps_whole_chunks_only(backend):
    """Regression: the first chunked pool mapped 2 MiB sub-ranges of 64 MiB chunks, which the documentation
    allows (cuMemMap's offset) but the lent H100's driver refuses; every mapping is now a whole chunk."""
    chunk = backend.create_chunk(4 * PAGE)
    base = backend.reserve(8 * PAGE)
    words = PAGE // 4
    try:
        with pytest.raises(BackendError, match="cuMemMap failed on cuda:0: CUDA_ERROR_NOT_SUPPORTED"):
            backend.map(base, 3 * PAGE, chunk, 0)
        with pytest.raises(BackendError, match="cuMemMap failed"):
            backend.map(base, PAGE, chunk, PAGE)
        backend.map(base + 4 * PAGE, 4 * PAGE, chunk, 0)
        backend.set_access(base + 4 * PAGE, 4 * PAGE)
        view = backend.tensor(base, 8 * PAGE).view(torch.int32)
        view[4 * words :] = torch.arange(4 * words, device=view.device, dtype=torch.int32)
        torch.cuda.synchronize()
        backend.unmap(base + 4 * PAGE, 4 * PAGE)
        backend.map(base, 4 * PAGE, chunk, 0)  # the same chunk, elsewhere: its contents move with it
        backend.set_access(base, 4 * PAGE)
        assert torch.equal(view[: 4 * words].cpu(), torch.arange(4 * words, dtype=torch.int32))
        del view
        torch.cuda.synchronize()
        backend.unmap(base, 4 * PAGE)
    finally:
        backend.destroy_chunk(chunk)
        backend.release(base, 8 * PAGE)


def test_weights_map_a_chunk_per_aligned_group_and_kv_uses_the_stock_of_single_pages(backend):
    counting = FaultInjectingBackend(backend)
    pool = PagePool(counting, 96 * PAGE, reserve_pages=96)
    assert pool.replenish_reserve() == 96
    snap = pool.snapshot()
    assert (snap.num_chunks, snap.num_free_chunks) == (34, 2), "32 single pages and two whole chunks"
    weights = WeightSpace(pool, "m", 40 * PAGE)
    assert counting.calls["map"] == 2 and counting.calls["set_access"] == 1, "pages 0-31 and 32-39: two chunks"
    assert [weights.vrange.handles[i][0].num_pages for i in (0, 32)] == [32, 8]
    values = weights.allocate((40 * PAGE // 4,), torch.int32)
    values.copy_(torch.arange(values.numel(), device=values.device, dtype=torch.int32))
    kv = KVSpace(pool, "m", block_bytes=PAGE, max_blocks=16, idle_pages=0)
    view = int32_blocks(kv)
    created = counting.calls["create_chunk"]
    for step in range(20):
        ids = kv.allocate(4)
        for b in ids:
            view[b].fill_(step)
        assert all(int(view[b][-1]) == step for b in ids)
        kv.free(ids)
    assert counting.calls["create_chunk"] == created, "KV pages came from the stock: no chunk created"
    assert pool.snapshot().num_free_chunks == 1
    torch.cuda.synchronize()
    assert torch.equal(values.cpu(), torch.arange(values.numel(), dtype=torch.int32)), "weights intact"
    pool.audit()
    del values, view
    kv.close()
    weights.close()
    pool.close()
    assert counting.calls["destroy_chunk"] == counting.calls["create_chunk"], "every chunk destroyed"


def test_pinned_host_memory_copies_to_the_device(backend):
    host = torch.arange(4 * MIB, dtype=torch.int32)
    backend.pin_host(host)
    try:
        assert host.is_pinned()
        on_device = host.to(backend.device, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_device.cpu(), host)
    finally:
        backend.unpin_host(host)
    assert not host.is_pinned()


def test_a_weight_image_built_for_a_gpu_is_pinned_before_its_fill(shm_dir):
    from memory.host_store import HostWeightStore

    store = HostWeightStore(64 * MIB, root=shm_dir, prefix="prism-test-")
    seen = {}

    def fill(image: torch.Tensor) -> None:
        seen["pinned"] = image.is_pinned()
        image.copy_(torch.full((image.numel(),), 7, dtype=torch.uint8, device="cuda:0"))  # a device-to-host fill

    image = store.acquire("m", 8 * MIB, fill, pin_device="cuda:0")
    try:
        assert seen == {"pinned": True} and image.pinned_on == "cuda:0" and image.pinned_pieces == [8 * MIB]  # one piece: fills copy anywhere
        assert int(image.tensor[-1]) == 7
        assert image.pin("cuda:0")  # the engine's own pin after acquire: a no-op now
    finally:
        store.release(image)
        store.drop_all(unlink=True)


def test_a_weight_image_is_pinned_a_piece_at_a_time(shm_dir, monkeypatch):
    from memory import host_store

    monkeypatch.setattr(host_store, "PIN_PIECE_BYTES", 4 * MIB)
    store = host_store.HostWeightStore(64 * MIB, root=shm_dir, prefix="prism-test-")
    image = store.acquire("m", 10 * MIB, lambda t: t.fill_(3))  # built without a device: not pinned
    try:
        assert image.pinned_bytes == 0 and not store.is_pinned("m")
        assert image.pin("cuda:0")
        assert image.pinned_pieces == [4 * MIB, 4 * MIB, 2 * MIB] and image.pinned_bytes == 10 * MIB and store.is_pinned("m")
        assert all(image.tensor[i * 4 * MIB : (i + 1) * 4 * MIB].is_pinned() for i in range(3))
        assert int(image.tensor[-MIB:].to("cuda:0").sum()) == 3 * MIB
    finally:
        store.release(image)
        store.drop_all(unlink=True)


def test_a_weight_image_the_driver_will_not_pin_stays_usable(tmp_path):
    """On a disk file system (the device machine's /tmp) cudaHostRegister of a file mapping is refused:
    the image is filled and read unpinned, and the refused call's error does not surface in later work."""
    from memory.host_store import HostWeightStore

    store = HostWeightStore(64 * MIB, root=tmp_path, prefix="prism-test-")
    image = store.acquire("m", 8 * MIB, lambda t: t.copy_(torch.full((t.numel(),), 5, dtype=torch.uint8, device="cuda:0")),
                          pin_device="cuda:0")
    try:
        assert (image.pinned_on == "cuda:0") != image.pin_refused
        assert image.pin("cuda:0") == (not image.pin_refused)  # a refusal is not retried
        on_device = image.tensor.to("cuda:0")
        assert int(on_device.sum()) == 5 * 8 * MIB
        torch.cuda.synchronize()
    finally:
        store.release(image)
        store.drop_all(unlink=True)
