"""KVSpace: block placement in pages, hysteresis, shortage, roll-back, budget shrinks and data integrity."""

from __future__ import annotations

import random

import pytest
import torch

from memory import BackendError, KVSpace
from tests.memory.checking_backend import PoolRig, make_rig
from tests.memory.weight_space import WeightSpace

KIB = 1024
PAGE = 16 * KIB


def make_space(rig: PoolRig, owner: str = "a", block_bytes: int = 4 * KIB, max_blocks: int = 64, idle_pages: int = 2):
    return KVSpace(rig.pool, owner, block_bytes, max_blocks, idle_pages)


def words(space: KVSpace) -> torch.Tensor:
    return space.tensor(torch.int32, (space.block_bytes // 4,))


def write_pattern(space: KVSpace, block_ids: list[int], salt: int) -> None:
    view = words(space)
    for b in block_ids:
        view[b] = salt * 100_000 + b


def assert_pattern(space: KVSpace, block_ids: list[int], salt: int) -> None:
    view = words(space)
    for b in block_ids:
        assert bool((view[b] == salt * 100_000 + b).all()), f"block {b} of {space.owner} was corrupted"


def assert_usable(rig: PoolRig, space: KVSpace, block_ids: list[int]) -> None:
    for b in block_ids:
        assert rig.checker.is_usable(space.vrange.base + b * space.block_bytes, space.block_bytes)


def test_allocation_fills_mapped_pages_before_mapping_new_ones():
    rig = make_rig(page_bytes=PAGE)
    space = make_space(rig, idle_pages=0)
    assert sorted(space.allocate(12)) == list(range(12))  # pages 0-2, 4 blocks each
    space.free([0, 1, 2, 3])  # page 0 empties and is unmapped (no hysteresis)
    space.free([8])  # page 2 keeps a free, ready block
    assert not space.vrange.is_mapped(0) and space.num_ready_blocks == 1
    assert space.allocate(1) == [8], "a ready block on a mapped page beats a lower id on an unmapped page"
    assert space.num_mapped_pages == 2
    assert sorted(space.allocate(2)) == [0, 1], "then the lowest ids, mapping their page"
    assert space.num_mapped_pages == 3
    space.audit()
    rig.assert_consistent()


@pytest.mark.parametrize("block_bytes", [6 * KIB, 40 * KIB, 16 * KIB])
def test_blocks_that_straddle_pages_are_backed_by_every_page_they_touch(block_bytes):
    rig = make_rig(page_bytes=PAGE, budget_pages=64)
    space = make_space(rig, block_bytes=block_bytes, max_blocks=20)
    taken: list[int] = []
    for n in (1, 2, 3, 1):
        block_ids = space.allocate(n)
        assert block_ids is not None and len(block_ids) == n
        taken += block_ids
        assert_usable(rig, space, taken)
        expected_pages = -(-(max(taken) + 1) * block_bytes // PAGE)
        assert space.num_mapped_pages == expected_pages, "pages are mapped exactly under the blocks in use"
        space.audit()
    write_pattern(space, taken, salt=1)
    assert_pattern(space, taken, salt=1)
    rig.assert_consistent()


def test_hysteresis_keeps_idle_pages_and_trim_gives_them_back():
    rig = make_rig(page_bytes=PAGE)
    space = make_space(rig, idle_pages=2)
    block_ids = space.allocate(16)  # 4 pages
    space.free(block_ids)
    assert (space.num_mapped_pages, space.num_idle_pages) == (2, 2), "two empty pages stay mapped"
    assert space.allocate(8) is not None and rig.pool.snapshot().kv_pages == {"a": 2}, "reused without a map"
    assert space.trim(0) == 0, "no page is idle while its blocks are allocated"
    space.free(list(range(8)))
    assert space.trim(0) == 2 and space.num_mapped_pages == 0
    assert rig.pool.snapshot().kv_pages == {}
    space.audit()
    rig.assert_consistent()


def test_without_trim_on_free_emptied_pages_wait_for_trim_and_stay_reclaimable():
    """A GPU worker's spaces: `free` never unmaps (an unmap waits for the device), `trim` does, between steps."""
    rig = make_rig(page_bytes=PAGE, budget_pages=6)
    space = KVSpace(rig.pool, "a", 4 * KIB, 64, idle_pages=1, trim_on_free=False)
    space.free(space.allocate(16))  # 4 pages empty out
    assert (space.num_mapped_pages, space.num_idle_pages) == (4, 4) and rig.pool.snapshot().num_pages_unmapped_total == 0
    assert space.allocate(8) is not None and rig.pool.snapshot().num_pages_mapped_total == 4, "reused without a map"
    space.free(list(range(8)))
    other = make_space(rig, "b")
    assert other.allocate(16) is not None, "4 pages: the 2 free ones and 2 of a's idle ones, reclaimed"
    assert space.num_idle_pages == 2
    assert space.trim_idle(has_work=True) == 1 and space.num_mapped_pages == 1  # what the worker's heartbeat does
    space.audit()
    other.audit()
    rig.assert_consistent()


def test_a_model_without_work_gives_every_empty_page_back_at_the_heartbeat():
    rig = make_rig(page_bytes=PAGE, budget_pages=6)
    space = KVSpace(rig.pool, "a", 4 * KIB, 64, idle_pages=2, trim_on_free=False)
    space.free(space.allocate(16))  # 4 pages empty out
    assert space.trim_idle(has_work=False) == 4 and space.num_mapped_pages == 0
    rig.assert_consistent()


def test_a_space_for_a_model_spans_the_pool_and_keeps_more_idle_pages_for_big_blocks():
    rig = make_rig(page_bytes=PAGE, budget_pages=6)
    small, big = KVSpace.for_model(rig.pool, "s", 4 * KIB), KVSpace.for_model(rig.pool, "b", PAGE // 2, trim_on_free=False)
    assert (small.max_blocks, small.idle_pages, small.trim_on_free) == (6 * 4, 2, True)
    assert (big.max_blocks, big.idle_pages, big.trim_on_free) == (6 * 2, 16, False)


def test_shortage_returns_none_and_changes_nothing():
    rig = make_rig(page_bytes=PAGE, budget_pages=3)
    space = make_space(rig, max_blocks=64)
    assert space.allocate(10) is not None  # 3 pages: 2 ready blocks left
    before = (rig.pool.snapshot(), space.num_free_blocks, space.num_ready_blocks)
    assert space.allocate(3) is None, "the third block would need a fourth page"
    assert space.allocate(100) is None, "more than max_blocks"
    assert (rig.pool.snapshot(), space.num_free_blocks, space.num_ready_blocks) == before
    assert space.num_blocks_backable() == 2
    assert sorted(space.allocate(2)) == [10, 11]
    space.audit()
    rig.assert_consistent()


def test_num_blocks_backable_is_exact_when_blocks_divide_pages():
    rig = make_rig(page_bytes=PAGE, budget_pages=5)
    a, b = make_space(rig, "a", max_blocks=64), make_space(rig, "b", max_blocks=64)
    assert b.allocate(5) is not None  # 2 of the 5 pages
    assert a.num_blocks_backable() == 12
    assert a.allocate(13) is None
    assert a.allocate(12) is not None
    assert a.num_blocks_backable() == 0 and b.num_blocks_backable() == 3


@pytest.mark.parametrize(
    "operation, nth, chunk_pages",
    [("create_chunk", 1, 4), ("create_chunk", 2, 1), ("map", 3, 4), ("set_access", 1, 4)],
)
def test_backend_error_mid_allocation_restores_state_and_the_same_blocks(operation, nth, chunk_pages):
    """Regression: a map failure used to drop the block ids popped for the allocation."""
    faulty, clean = (make_rig(page_bytes=PAGE, chunk_pages=chunk_pages) for _ in range(2))
    spaces = [make_space(rig, block_bytes=6 * KIB) for rig in (faulty, clean)]
    for space in spaces:
        assert space.allocate(3) is not None  # pages 0-1, block 3 ready
    space = spaces[0]

    def state() -> tuple:
        return faulty.pool.snapshot().kv_pages, space.num_free_blocks, space.num_ready_blocks, space.num_mapped_pages

    before = state()
    faulty.faults.fail_at(operation, nth)
    with pytest.raises(BackendError):
        space.allocate(8)  # block 3 is ready; blocks 4-10 need pages 2-4
    assert state() == before
    space.audit()
    faulty.assert_consistent()
    assert sorted(space.allocate(8)) == sorted(spaces[1].allocate(8)) == list(range(3, 11))
    space.audit()
    faulty.assert_consistent()


def test_budget_shrink_keeps_live_blocks_intact_and_maps_fail_until_usage_fits():
    rig = make_rig(page_bytes=PAGE, budget_pages=12)
    a, b = make_space(rig, "a", idle_pages=0), make_space(rig, "b", block_bytes=6 * KIB, idle_pages=0)
    a_ids, b_ids = a.allocate(20), b.allocate(16)  # 5 + 6 pages
    write_pattern(a, a_ids, salt=1)
    write_pattern(b, b_ids, salt=2)
    assert rig.pool.set_budget(7 * PAGE) == 4
    assert_pattern(a, a_ids, salt=1)
    assert_pattern(b, b_ids, salt=2)
    assert a.allocate(1) is None, "over budget: no new page"
    b.free(b_ids[8:])  # blocks 8-15 of b: 48 KiB from byte 48K, pages 3-5 empty out
    assert rig.pool.snapshot().pages_over_budget == 1
    assert a.allocate(1) is None, "still one page over"
    b.free(b_ids[:3])  # blocks 0-2: page 0 empties
    assert rig.pool.snapshot().pages_over_budget == 0
    assert a.allocate(1) is None, "exactly at the budget: no free page"
    b.free(b_ids[3:8])
    extra = a.allocate(1)
    assert extra is not None
    assert_pattern(a, a_ids, salt=1)
    assert_usable(rig, a, a_ids + extra)
    rig.assert_consistent()


def test_data_survives_while_a_neighbour_maps_and_unmaps_around_it():
    rig = make_rig(page_bytes=PAGE, budget_pages=24)
    steady = make_space(rig, "steady", block_bytes=6 * KIB)
    churn = make_space(rig, "churn", block_bytes=4 * KIB, max_blocks=80, idle_pages=1)
    steady_ids = steady.allocate(10)
    write_pattern(steady, steady_ids, salt=7)
    rng = random.Random(1)
    live: list[int] = []
    num_unmaps = 0
    for _ in range(200):
        if live and rng.random() < 0.5:
            victims = rng.sample(live, rng.randint(1, len(live)))
            live = [b for b in live if b not in victims]
            mapped_before = churn.num_mapped_pages
            churn.free(victims)
            num_unmaps += mapped_before - churn.num_mapped_pages
        else:
            new = churn.allocate(rng.randint(1, 12))
            if new:
                write_pattern(churn, new, salt=3)
                live += new
        assert_pattern(steady, steady_ids, salt=7)
        assert_pattern(churn, live, salt=3)
    assert num_unmaps > 10, "the neighbour really unmapped pages"
    churn.audit()
    rig.assert_consistent()


def test_misuse_raises():
    rig = make_rig(page_bytes=PAGE)
    space = make_space(rig)
    block_ids = space.allocate(2)
    for bad in ([5], [block_ids[0], block_ids[0]], [-1], [64]):
        with pytest.raises(ValueError):
            space.free(bad)
    with pytest.raises(ValueError):
        space.allocate(-1)
    assert space.num_used_blocks == 2, "a rejected free frees nothing"
    space.free(block_ids)
    with pytest.raises(ValueError):
        space.free(block_ids)
    space.close()
    space.close()
    for use in (lambda: space.allocate(1), lambda: space.free([0]), lambda: space.tensor(torch.uint8, (4 * KIB,))):
        with pytest.raises(ValueError):
            use()
    assert rig.pool.snapshot().pages_mapped == 0
    rig.assert_consistent()


def test_close_drops_allocated_blocks_and_returns_every_page():
    rig = make_rig(page_bytes=PAGE)
    space = make_space(rig)
    assert space.allocate(30) is not None
    space.close()
    assert rig.pool.snapshot().pages_mapped == 0 and rig.checker.reservations == {}
    rig.assert_consistent()


def test_lazy_heaps_stay_bounded_under_churn():
    rig = make_rig(page_bytes=PAGE, budget_pages=64)
    space = make_space(rig, max_blocks=256, idle_pages=0)
    rng = random.Random(2)
    for _ in range(300):
        block_ids = space.allocate(rng.randint(1, 40))
        if block_ids:
            space.free(block_ids)
    assert len(space._ready._heap) <= 2 * space.num_ready_blocks + 64
    assert len(space._unbacked._heap) <= 2 * (space.num_free_blocks - space.num_ready_blocks) + 64
    space.audit()



def test_idle_pages_of_one_model_are_reclaimed_when_another_runs_short():
    rig = make_rig(page_bytes=PAGE, budget_pages=8)
    holder, other = make_space(rig, "holder", idle_pages=4), make_space(rig, "other")
    kept = holder.allocate(8)  # pages 0-1
    holder.free(holder.allocate(16))  # pages 2-5 stay mapped, idle
    write_pattern(holder, kept, salt=5)
    assert (holder.num_idle_pages, rig.pool.num_free_pages) == (4, 2)

    assert other.allocate(16) is not None, "4 pages: the 2 free ones and 2 reclaimed from the holder"
    assert holder.num_idle_pages == 2 and rig.pool.snapshot().pages_mapped == 8
    assert other.allocate(20) is None, "5 more pages exceed the 2 idle ones"
    assert holder.num_idle_pages == 2, "a reclaim that cannot cover the shortage takes nothing"
    WeightSpace(rig.pool, "weights", 2 * PAGE)
    assert holder.num_idle_pages == 0
    assert_pattern(holder, kept, salt=5)
    holder.audit()
    other.audit()
    rig.assert_consistent()
    snap = rig.pool.snapshot()
    assert (snap.num_pages_mapped_total, snap.num_pages_unmapped_total) == (12, 4)
