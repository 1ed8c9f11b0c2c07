"""PagePool: budget, accounting per owner and kind, the reserve, misuse, roll-back and budget waits."""

from __future__ import annotations

import threading
import time

import pytest

from memory import BackendError, MemoryKind
from tests.memory.checking_backend import make_rig

KV, WEIGHTS = MemoryKind.KV, MemoryKind.WEIGHTS


def test_map_is_all_or_nothing_against_the_budget():
    rig = make_rig(budget_pages=8)
    pool = rig.pool
    a = pool.reserve_range("a", KV, 10 * pool.page_bytes)
    assert pool.map_pages(a, range(6))
    assert not pool.map_pages(a, range(6, 9)), "3 more pages exceed a budget of 8 with 6 mapped"
    assert pool.snapshot().pages_mapped == 6 and not any(a.is_mapped(i) for i in range(6, 9))
    assert pool.map_pages(a, [6, 7])
    assert pool.num_free_pages == 0
    rig.assert_consistent()


def test_accounting_is_per_owner_and_kind():
    rig = make_rig(budget_pages=16)
    pool = rig.pool
    a_kv = pool.reserve_range("a", KV, 4 * pool.page_bytes)
    a_weights = pool.reserve_range("a", WEIGHTS, 3 * pool.page_bytes)
    b_kv = pool.reserve_range("b", "kv", 2 * pool.page_bytes)
    assert pool.map_pages(a_kv, [0, 2]) and pool.map_pages(a_weights, range(3)) and pool.map_pages(b_kv, [1])
    snap = pool.snapshot()
    assert (snap.kv_pages, snap.weight_pages) == ({"a": 2, "b": 1}, {"a": 3})
    assert pool.pages_of("a", WEIGHTS) == 3 and pool.pages_of("b", "kv") == 1 and pool.pages_of("c", KV) == 0
    pool.unmap_pages(a_kv, [2])
    pool.release_range(a_weights)
    snap = pool.snapshot()
    assert (snap.kv_pages, snap.weight_pages, snap.pages_mapped) == ({"a": 1, "b": 1}, {}, 2)
    rig.assert_consistent()


def test_snapshot_counts_the_virtual_reservations_alive():
    rig = make_rig(budget_pages=16)
    pool = rig.pool
    a = pool.reserve_range("a", KV, 4 * pool.page_bytes)
    b = pool.reserve_range("b", WEIGHTS, 3 * pool.page_bytes - 1)  # rounded up to whole pages
    snap = pool.snapshot()
    assert (snap.ranges_reserved, snap.va_bytes_reserved) == (2, 7 * pool.page_bytes)
    pool.release_range(a)
    pool.release_range(b)
    snap = pool.snapshot()
    assert (snap.ranges_reserved, snap.va_bytes_reserved) == (0, 0), "a released range's address space is no longer counted"


def test_reserve_is_reused_and_stays_within_target_and_budget():
    rig = make_rig(budget_pages=6, reserve_pages=4, chunk_pages=1)  # a chunk per page: page-exact reserve
    pool = rig.pool
    assert pool.replenish_reserve() == 4
    created = rig.faults.calls["create_chunk"]
    a = pool.reserve_range("a", KV, 6 * pool.page_bytes)
    assert pool.map_pages(a, range(3))
    assert rig.faults.calls["create_chunk"] == created, "mapping took pages from the reserve"
    assert pool.snapshot().pages_reserved == 1
    assert pool.replenish_reserve() == 2, "3 mapped + 3 reserved fill a budget of 6"
    pool.unmap_pages(a, range(3))
    assert pool.snapshot().pages_reserved == 4, "unmapped pages refill the reserve up to its target"
    rig.assert_consistent()
    pool.set_budget(2 * pool.page_bytes)
    assert pool.snapshot().pages_reserved == 2, "a shrink trims the reserve to the budget first"
    rig.assert_consistent()


@pytest.mark.parametrize(
    "misuse",
    [
        lambda pool, r: pool.map_pages(r, [0, 0, 4]),
        lambda pool, r: pool.map_pages(r, [1]),  # already mapped
        lambda pool, r: pool.unmap_pages(r, [2]),  # not mapped
        lambda pool, r: pool.unmap_pages(r, [-1]),
        lambda pool, r: pool.reserve_range("x", KV, 0),
        lambda pool, r: pool.set_budget(-1),
    ],
)
def test_misuse_raises_and_changes_nothing(misuse):
    rig = make_rig(budget_pages=8)
    pool = rig.pool
    r = pool.reserve_range("a", KV, 4 * pool.page_bytes)
    assert pool.map_pages(r, [1])
    before = pool.snapshot()
    with pytest.raises(ValueError):
        misuse(pool, r)
    assert pool.snapshot() == before
    rig.assert_consistent()


def test_released_range_is_no_longer_usable():
    rig = make_rig()
    pool = rig.pool
    r = pool.reserve_range("a", KV, 2 * pool.page_bytes)
    assert pool.map_pages(r, [0, 1])
    pool.release_range(r)
    assert r.released and rig.checker.reservations == {}
    for use in (lambda: pool.map_pages(r, [0]), lambda: pool.release_range(r), lambda: pool.tensor(r)):
        with pytest.raises(ValueError):
            use()
    rig.assert_consistent()


@pytest.mark.parametrize(
    "operation, nth, chunk_pages",
    [("create_chunk", 3, 1), ("create_chunk", 1, 4), ("map", 2, 4), ("map", 5, 4), ("set_access", 2, 4)],
)
def test_backend_fault_rolls_back_every_page_of_the_call(operation, nth, chunk_pages):
    rig = make_rig(budget_pages=16, reserve_pages=2, chunk_pages=chunk_pages)
    pool = rig.pool
    r = pool.reserve_range("a", KV, 12 * pool.page_bytes)
    assert pool.map_pages(r, [0])
    pool.replenish_reserve()
    before = (pool.snapshot(), list(r.handles))
    rig.faults.fail_at(operation, nth)
    with pytest.raises(BackendError, match="injected"):
        pool.map_pages(r, [2, 3, 5, 6, 7, 9])  # three runs: one set_access each
    assert not rig.faults.pending_faults, "the fault fired"
    after = pool.snapshot()
    assert (after.pages_mapped, after.kv_pages) == (before[0].pages_mapped, before[0].kv_pages)
    assert [h is None for h in r.handles] == [h is None for h in before[1]]
    rig.assert_consistent()
    assert pool.map_pages(r, [2, 3, 5, 6, 7, 9]), "the same pages map once the fault is gone"
    rig.assert_consistent()


def test_unmap_synchronizes_the_device_once_per_call():
    rig = make_rig()
    pool = rig.pool
    r = pool.reserve_range("a", KV, 4 * pool.page_bytes)
    assert pool.map_pages(r, range(4))
    pool.unmap_pages(r, [0, 1, 2])
    assert rig.checker.num_synchronize == 1


def test_shrink_reports_overage_and_blocks_maps_until_it_is_gone():
    rig = make_rig(budget_pages=10)
    pool = rig.pool
    r = pool.reserve_range("a", KV, 10 * pool.page_bytes)
    assert pool.map_pages(r, range(8))
    assert pool.set_budget(5 * pool.page_bytes) == 3
    assert pool.snapshot().pages_over_budget == 3 and all(r.is_mapped(i) for i in range(8))
    pool.unmap_pages(r, [7, 6])
    assert not pool.map_pages(r, [6]), "still one page over the budget"
    pool.unmap_pages(r, [5, 4])
    assert pool.map_pages(r, [4])
    assert not pool.map_pages(r, [5])
    rig.assert_consistent()


def test_wait_until_within_budget_returns_when_another_thread_unmaps():
    rig = make_rig(budget_pages=8)
    pool = rig.pool
    r = pool.reserve_range("a", KV, 8 * pool.page_bytes)
    assert pool.map_pages(r, range(8))
    pool.set_budget(4 * pool.page_bytes)
    assert not pool.wait_until_within_budget(timeout_s=0)
    go = threading.Event()

    def unmap_in_two_steps() -> None:
        go.wait()
        pool.unmap_pages(r, [7, 6])
        pool.unmap_pages(r, [5, 4])

    freer = threading.Thread(target=unmap_in_two_steps)
    freer.start()
    go.set()
    started = time.monotonic()
    assert pool.wait_until_within_budget(timeout_s=30)
    # A missed wake-up would only return at the timeout: the waiter must be woken by the unmap itself.
    assert time.monotonic() - started < 15
    freer.join()
    assert pool.snapshot().pages_mapped == 4
    rig.assert_consistent()


def test_wait_until_within_budget_wakes_when_the_budget_grows():
    rig = make_rig(budget_pages=4)
    pool = rig.pool
    r = pool.reserve_range("a", KV, 4 * pool.page_bytes)
    assert pool.map_pages(r, range(4))
    pool.set_budget(2 * pool.page_bytes)
    result: list[bool] = []
    waiting = threading.Event()

    def wait() -> None:
        waiting.set()
        result.append(pool.wait_until_within_budget(timeout_s=30))

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiting.wait()
    started = time.monotonic()
    pool.set_budget(4 * pool.page_bytes)
    waiter.join()
    assert result == [True] and time.monotonic() - started < 15
