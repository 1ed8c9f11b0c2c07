"""PagePool over chunks mapped whole: a run of weights is one chunk and one map call, KV pages are one-page
chunks, unmaps cover whole mappings, sizes change by destroying free chunks and creating others, the
reserve keeps single pages for KV and merges loose pages back into whole chunks, faults roll back."""

from __future__ import annotations

import pytest
import torch

from memory import BackendError, KVSpace, MemoryKind
from tests.memory.checking_backend import PoolRig, make_rig
from tests.memory.weight_space import WeightSpace

KV, WEIGHTS = MemoryKind.KV, MemoryKind.WEIGHTS
CHUNK = 4


def chunked_rig(budget_pages: int = 16, reserve_pages: int | None = None) -> PoolRig:
    """Every page created up front, as the worker does on a GPU (reserve = budget)."""
    reserve = budget_pages if reserve_pages is None else reserve_pages
    rig = make_rig(budget_pages=budget_pages, reserve_pages=reserve, chunk_pages=CHUNK)
    rig.pool.replenish_reserve()
    return rig


def chunk_sizes(rig: PoolRig) -> list[int]:
    return sorted(rig.checker.chunks.values())


def test_reserve_equal_to_the_budget_creates_a_stock_of_pages_whole_chunks_and_pages_for_the_rest():
    rig = make_rig(budget_pages=14, reserve_pages=14, chunk_pages=CHUNK)
    assert rig.pool.replenish_reserve() == 14
    assert chunk_sizes(rig) == [1] * 6 + [CHUNK, CHUNK], "4 single pages, two whole chunks, 2 pages for the rest"
    snap = rig.pool.snapshot()
    assert (snap.num_chunks, snap.num_free_chunks, snap.pages_reserved, snap.chunk_pages) == (8, 2, 14, CHUNK)
    rig.assert_consistent()


def test_an_aligned_run_of_weights_is_one_whole_chunk_one_map_and_one_set_access():
    rig = chunked_rig()
    w = rig.pool.reserve_range("w", WEIGHTS, 10 * rig.pool.page_bytes)
    calls = rig.faults.calls.copy()
    assert rig.pool.map_pages(w, range(4))
    assert rig.faults.calls["map"] - calls["map"] == 1 and rig.faults.calls["set_access"] - calls["set_access"] == 1
    chunk = w.handles[0][0]
    assert w.handles[:4] == [(chunk, i) for i in range(4)] and chunk.num_pages == CHUNK
    assert rig.pool.map_pages(w, range(4, 10)), "pages 4-7 and 8-9: split at the chunk boundary"
    assert rig.checker.map_sizes[-2:] == [4, 2], "a two-page chunk for the tail"
    rig.assert_consistent()


def test_kv_pages_are_single_chunks_from_the_stock_and_unmap_one_by_one():
    rig = chunked_rig()
    pool = rig.pool
    kv = pool.reserve_range("kv", KV, 8 * pool.page_bytes)
    created = rig.faults.calls["create_chunk"]
    before = len(rig.checker.map_sizes)
    assert pool.map_pages(kv, [0, 1, 2])
    assert rig.checker.map_sizes[before:] == [1, 1, 1] and rig.faults.calls["create_chunk"] == created
    assert pool.snapshot().num_free_chunks == 3, "whole chunks untouched"
    pool.unmap_pages(kv, [1])
    assert not kv.is_mapped(1) and kv.is_mapped(0) and kv.is_mapped(2)
    rig.assert_consistent()


def test_part_of_a_weight_run_cannot_be_unmapped_but_the_whole_run_is_one_unmap():
    rig = chunked_rig()
    pool = rig.pool
    w = pool.reserve_range("w", WEIGHTS, 4 * pool.page_bytes)
    assert pool.map_pages(w, range(4))
    before = pool.snapshot()
    with pytest.raises(ValueError, match="pages 0-3 of w/weights were mapped as one run"):
        pool.unmap_pages(w, [1, 2])
    assert pool.snapshot() == before and all(w.is_mapped(i) for i in range(4))
    calls = rig.faults.calls["unmap"]
    pool.unmap_pages(w, range(4))
    assert rig.faults.calls["unmap"] - calls == 1 and pool.snapshot().num_free_chunks == 3
    rig.assert_consistent()


def test_without_a_free_chunk_of_its_size_a_run_destroys_loose_pages_and_creates_one():
    rig = chunked_rig(budget_pages=8)  # 4 single pages, one whole chunk
    pool = rig.pool
    w1 = pool.reserve_range("w1", WEIGHTS, 4 * pool.page_bytes)
    assert pool.map_pages(w1, range(4))  # the whole chunk
    w2 = pool.reserve_range("w2", WEIGHTS, 4 * pool.page_bytes)
    destroyed = rig.faults.calls["destroy_chunk"]
    assert pool.map_pages(w2, range(4)), "4 free single pages become one chunk"
    assert rig.faults.calls["destroy_chunk"] - destroyed == 4 and rig.checker.map_sizes[-1] == 4
    view = pool.tensor(w2)
    view.fill_(7)
    assert bool((view == 7).all())
    rig.assert_consistent()


def test_a_kv_page_without_stock_or_room_splits_the_smallest_spare_chunk():
    rig = chunked_rig(budget_pages=8, reserve_pages=8)
    pool = rig.pool
    kv = pool.reserve_range("kv", KV, 8 * pool.page_bytes)
    assert pool.map_pages(kv, range(5)), "four from the stock, then the whole chunk is split"
    assert chunk_sizes(rig) == [1] * 5, "the whole chunk is gone: 3 pages of room are left uncreated"
    assert pool.snapshot().pages_reserved == 0
    pool.replenish_reserve()
    assert chunk_sizes(rig) == [1] * 8
    rig.assert_consistent()


def test_replenish_merges_surplus_loose_pages_back_into_whole_chunks():
    rig = chunked_rig(budget_pages=20, reserve_pages=20)  # 4 single pages, 4 whole chunks
    pool = rig.pool
    kv = pool.reserve_range("kv", KV, 20 * pool.page_bytes)
    assert pool.map_pages(kv, range(20)) and pool.snapshot().num_free_chunks == 0
    pool.unmap_pages(kv, range(20))
    assert chunk_sizes(rig) == [1] * 20
    pool.replenish_reserve()
    assert chunk_sizes(rig) == [1] * 8 + [CHUNK] * 3, "loose pages beyond twice the stock of 4 merged"
    rig.assert_consistent()


@pytest.mark.parametrize("operation, nth, min_pages", [("map", 1, 2), ("map", 3, 2), ("set_access", 1, 1)])
def test_fault_on_a_run_map_rolls_back_and_the_chunks_are_free_again(operation, nth, min_pages):
    rig = chunked_rig()
    pool = rig.pool
    w = pool.reserve_range("w", WEIGHTS, 12 * pool.page_bytes)
    before = pool.snapshot()
    rig.faults.fail_at(operation, nth, min_pages)
    with pytest.raises(BackendError, match="injected"):
        pool.map_pages(w, range(12))
    assert not rig.faults.pending_faults
    assert pool.snapshot() == before and w.num_mapped == 0
    assert not rig.checker.mappings, "every mapping made by the call was undone"
    rig.assert_consistent()
    assert pool.map_pages(w, range(12)) and rig.checker.map_sizes[-3:] == [4, 4, 4]
    rig.assert_consistent()


def test_fault_on_create_after_making_room_keeps_the_books_exact():
    rig = chunked_rig(budget_pages=8)
    pool = rig.pool
    w1 = pool.reserve_range("w1", WEIGHTS, 4 * pool.page_bytes)
    assert pool.map_pages(w1, range(4))
    w2 = pool.reserve_range("w2", WEIGHTS, 4 * pool.page_bytes)
    rig.faults.fail_at("create_chunk")
    with pytest.raises(BackendError):
        pool.map_pages(w2, range(4))
    assert w2.num_mapped == 0 and pool.snapshot().pages_reserved == 0, "the destroyed pages stay destroyed"
    rig.assert_consistent()
    assert pool.map_pages(w2, range(4)), "the room is still there"
    rig.assert_consistent()


def test_fault_on_unmap_keeps_the_books_exact_and_a_retry_finishes():
    rig = chunked_rig()
    pool = rig.pool
    w = pool.reserve_range("w", WEIGHTS, 8 * pool.page_bytes)
    assert pool.map_pages(w, range(8))
    rig.faults.fail_at("unmap", 2)
    with pytest.raises(BackendError):
        pool.unmap_pages(w, range(8))
    assert w.num_mapped == 4 and pool.snapshot().weight_pages == {"w": 4}
    rig.assert_consistent()
    pool.unmap_pages(w, [i for i in range(8) if w.is_mapped(i)])
    assert pool.snapshot().pages_mapped == 0
    rig.assert_consistent()


def test_shrink_destroys_free_chunks_largest_first_and_never_mapped_ones():
    rig = chunked_rig(budget_pages=16)
    pool = rig.pool
    w = pool.reserve_range("w", WEIGHTS, 4 * pool.page_bytes)
    assert pool.map_pages(w, range(4))
    assert pool.set_budget(6 * pool.page_bytes) == 0
    assert chunk_sizes(rig) == [1, 1, CHUNK], "whole free chunks went first, then single pages down to 6"
    assert pool.set_budget(2 * pool.page_bytes) == 2 and chunk_sizes(rig) == [CHUNK]
    rig.assert_consistent()


def test_chunks_freed_after_close_are_destroyed_too():
    rig = chunked_rig()
    pool = rig.pool
    space = KVSpace(pool, "a", block_bytes=pool.page_bytes, max_blocks=8, idle_pages=0)
    weights = WeightSpace(pool, "a", 5 * pool.page_bytes)
    assert space.allocate(3) is not None
    pool.close()
    assert chunk_sizes(rig) == [1, 1, 1, 1, CHUNK], "the chunks in use stay"
    weights.close()
    space.close()
    assert not rig.checker.chunks and not rig.checker.reservations, "no chunk leaked"
    rig.assert_consistent()


def test_weights_and_kv_keep_their_data_while_pages_change_hands():
    rig = chunked_rig(budget_pages=12)
    pool = rig.pool
    weights = WeightSpace(pool, "m", 6 * pool.page_bytes)
    values = weights.allocate((6 * pool.page_bytes // 4,), torch.int32)
    values.copy_(torch.arange(values.numel(), dtype=torch.int32))
    space = KVSpace(pool, "m", block_bytes=pool.page_bytes, max_blocks=8, idle_pages=0)
    view = space.tensor(torch.int32, (pool.page_bytes // 4,))
    for step in range(5):
        ids = space.allocate(6)
        assert ids is not None
        for b in ids:
            view[b] = step
        assert all(bool((view[b] == step).all()) for b in ids)
        space.free(ids)
        pool.replenish_reserve()
        rig.assert_consistent()
    assert torch.equal(values, torch.arange(values.numel(), dtype=torch.int32))
