"""PagePool's capture scratch: a whole weights range backed by one chunk and one page, whatever its size.

What it is for: recording a model's CUDA graphs ahead of its activation when the pool cannot lend the
model's weights (a full pool of resident models): 20 models on an H100 left two "staged, graphs pending"
because a capture ahead mapped the model's own 2.4 GB of pages.
"""

from __future__ import annotations

import pytest

from memory import BackendError, MemoryKind
from tests.memory.checking_backend import make_rig

KV, WEIGHTS = MemoryKind.KV, MemoryKind.WEIGHTS


def pool_with_resident(kind: MemoryKind, num_pages: int):
    """A 16-page pool (chunks of 4) where another model already holds `num_pages` pages."""
    rig = make_rig(budget_pages=16, chunk_pages=4)
    resident = rig.pool.reserve_range("resident", kind, num_pages * rig.pool.page_bytes)
    assert rig.pool.map_pages(resident, range(num_pages))
    return rig, rig.pool


def test_the_scratch_backs_a_whole_range_with_one_chunk_at_each_group_and_one_page_at_each_tail_page():
    rig = make_rig(budget_pages=32, chunk_pages=4)
    pool = rig.pool
    weights = pool.reserve_range("m", WEIGHTS, 10 * pool.page_bytes)  # two whole groups and two tail pages
    assert pool.scratch_pages_for(weights) == 5
    assert pool.map_scratch(weights)
    assert rig.checker.map_sizes == [4, 4, 1, 1]
    assert rig.checker.is_usable(weights.base, weights.num_bytes)
    snap = pool.snapshot()
    assert (snap.pages_mapped, snap.scratch_pages, snap.weight_pages) == (5, 5, {})
    assert weights.num_mapped == 0 and not any(weights.is_mapped(i) for i in range(10)), "the model holds none of it"
    rig.assert_consistent()
    pool.unmap_scratch(weights)
    assert pool.snapshot().pages_mapped == 0 and not rig.checker.is_usable(weights.base, pool.page_bytes)
    assert pool.map_pages(weights, range(10)), "the range maps its own pages once the scratch is out"
    rig.assert_consistent()


def test_a_range_larger_than_the_budget_borrows_only_the_scratch():
    rig, pool = pool_with_resident(WEIGHTS, 8)
    big = pool.reserve_range("big", WEIGHTS, 40 * pool.page_bytes)  # 2.5 budgets
    assert pool.map_scratch(big)
    assert pool.snapshot().pages_mapped == 8 + 4
    rig.assert_consistent()
    pool.unmap_scratch(big)
    assert pool.snapshot().pages_mapped == 8
    rig.assert_consistent()


def test_the_scratch_is_refused_and_nothing_mapped_when_the_budget_cannot_lend_it():
    rig, pool = pool_with_resident(KV, 13)
    weights = pool.reserve_range("m", WEIGHTS, 9 * pool.page_bytes)  # a chunk and a page: 5 > 3 free
    calls = sum(rig.faults.calls.values())
    assert not pool.map_scratch(weights)
    assert sum(rig.faults.calls.values()) == calls, "no backend call"
    assert pool.snapshot().pages_mapped == 13 and pool.snapshot().scratch_pages == 0
    rig.assert_consistent()


def test_two_ranges_share_the_scratch_and_the_last_one_out_returns_it():
    rig = make_rig(budget_pages=32, chunk_pages=4)
    pool = rig.pool
    a = pool.reserve_range("a", WEIGHTS, 8 * pool.page_bytes)
    b = pool.reserve_range("b", WEIGHTS, 6 * pool.page_bytes)
    assert pool.map_scratch(a) and pool.scratch_pages_for(b) == 1  # only the page for b's tail is new
    assert pool.map_scratch(b)
    assert pool.snapshot().pages_mapped == 5
    rig.assert_consistent()
    pool.unmap_scratch(a)
    assert pool.snapshot().pages_mapped == 5 and rig.checker.is_usable(b.base, b.num_bytes)
    pool.release_range(b)  # a released range gives its scratch back too
    assert pool.snapshot().pages_mapped == 0
    rig.assert_consistent()


@pytest.mark.parametrize("operation, nth", [("map", 2), ("set_access", 1), ("create_chunk", 2)])
def test_a_backend_fault_while_mapping_the_scratch_leaves_nothing_mapped(operation, nth):
    rig = make_rig(budget_pages=32, chunk_pages=4)
    pool = rig.pool
    weights = pool.reserve_range("m", WEIGHTS, 10 * pool.page_bytes)
    rig.faults.fail_at(operation, nth)
    with pytest.raises(BackendError, match="injected"):
        pool.map_scratch(weights)
    assert pool.snapshot().pages_mapped == 0 and pool.snapshot().scratch_pages == 0
    rig.assert_consistent()
    assert pool.map_scratch(weights), "the same scratch maps once the fault is gone"
    pool.unmap_scratch(weights)
    rig.assert_consistent()


def test_misuse_of_the_scratch_raises_and_changes_nothing():
    rig = make_rig(budget_pages=32, chunk_pages=4)
    pool = rig.pool
    kv = pool.reserve_range("m", KV, 4 * pool.page_bytes)
    weights = pool.reserve_range("m", WEIGHTS, 8 * pool.page_bytes)
    partly = pool.reserve_range("p", WEIGHTS, 8 * pool.page_bytes)
    assert pool.map_pages(partly, range(4))
    with pytest.raises(ValueError, match="weights range"):
        pool.map_scratch(kv)
    with pytest.raises(ValueError, match="4 pages mapped"):
        pool.map_scratch(partly)
    with pytest.raises(ValueError, match="does not hold"):
        pool.unmap_scratch(weights)
    assert pool.map_scratch(weights)
    with pytest.raises(ValueError, match="holds the capture scratch"):
        pool.map_pages(weights, [0])
    with pytest.raises(ValueError, match="weights range"):
        pool.map_scratch(weights)  # twice
    assert pool.snapshot().pages_mapped == 4 + 4
    rig.assert_consistent()


@pytest.mark.gpu
def test_gpu_the_driver_maps_the_scratch_at_every_group_and_each_address_sees_the_same_bytes():
    import torch

    from memory import CudaBackend, PagePool

    backend = CudaBackend("cuda:0")
    pool = PagePool(backend, 64 * backend.page_bytes, reserve_pages=0, chunk_pages=4)
    weights = pool.reserve_range("m", WEIGHTS, 10 * pool.page_bytes)
    try:
        assert pool.map_scratch(weights)
        view = pool.tensor(weights)
        page = pool.page_bytes
        view[:page].fill_(7)  # the first group's first page: the whole chunk's page 0
        view[9 * page:].fill_(9)  # a tail page: the one-page chunk
        torch.cuda.synchronize()
        assert int(view[4 * page]) == 7, "the second group is the same chunk"
        assert int(view[8 * page]) == 9, "every tail page is the same page"
        pool.unmap_scratch(weights)
        assert pool.snapshot().pages_mapped == 0
        assert pool.map_pages(weights, range(10))
        pool.audit()
    finally:
        pool.release_range(weights)
        pool.close()
        backend.close()
