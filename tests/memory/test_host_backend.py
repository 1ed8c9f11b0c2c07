"""Host backend: pages really come and go from the process's resident memory, and faults are injected."""

from __future__ import annotations

import mmap

import pytest
import torch

from memory import BackendError, FaultInjectingBackend, HostBackend, KVSpace, PagePool
from tests.memory.weight_space import WeightSpace

MIB = 1024 * 1024


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def test_resident_memory_rises_when_pages_are_written_and_returns_after_frees():
    pool = PagePool(HostBackend(2 * MIB), budget_bytes=128 * MIB)
    kv = KVSpace(pool, "a", block_bytes=512 * 1024, max_blocks=256, idle_pages=2)
    kv_view = kv.tensor(torch.uint8, (512 * 1024,))
    idle = resident_bytes()

    block_ids = kv.allocate(128)  # 64 MiB
    weights = WeightSpace(pool, "a", 32 * MIB)
    weight = weights.allocate((32 * MIB,), torch.uint8)
    kv_view[min(block_ids) : max(block_ids) + 1] = 1  # touch every byte, so the kernel backs the pages
    weight.fill_(1)
    grown = resident_bytes()
    assert grown - idle >= 90 * MIB, f"resident memory grew by {(grown - idle) / MIB:.1f} MiB, expected ~96"

    del weight
    weights.close()
    kv.free(block_ids)
    assert kv.num_mapped_pages == 2, "hysteresis keeps two empty pages"
    kv.trim(0)
    returned = resident_bytes()
    assert returned - idle < 8 * MIB, f"{(returned - idle) / MIB:.1f} MiB still resident after every free"
    kv.close()


def test_remapped_host_page_reads_zero():
    pool = PagePool(HostBackend(64 * 1024), budget_bytes=MIB)
    kv = KVSpace(pool, "a", block_bytes=64 * 1024, max_blocks=4, idle_pages=0)
    view = kv.tensor(torch.uint8, (64 * 1024,))
    (block,) = kv.allocate(1)
    view[block] = 7
    kv.free([block])
    assert kv.allocate(1) == [block]
    assert int(view[block].sum()) == 0, "the unmapped page's contents were dropped (MADV_DONTNEED)"


def test_host_page_size_must_fit_the_os_page():
    with pytest.raises(ValueError):
        HostBackend(mmap.PAGESIZE + 1)


def test_fault_fires_once_at_the_chosen_call_and_counts_calls():
    page = 64 * 1024
    backend = FaultInjectingBackend(HostBackend(page))
    backend.fail_at("create_chunk", 2)
    assert backend.pending_faults == {"create_chunk": 2}
    backend.create_chunk(4 * page)
    with pytest.raises(BackendError, match="create_chunk call 2"):
        backend.create_chunk(4 * page)
    handle = backend.create_chunk(4 * page)
    assert backend.calls["create_chunk"] == 3 and backend.pending_faults == {}
    with pytest.raises(ValueError):
        backend.fail_at("no_such_call")
    with pytest.raises(ValueError):
        backend.fail_at("map", 0)
    with pytest.raises(ValueError):
        backend.fail_at("unmap", 1, min_pages=2)

    base = backend.reserve(8 * page)
    backend.fail_at("map", 1, min_pages=2)  # single pages pass; the first run-map fails
    assert backend.pending_faults == {"map_run": 1}
    backend.map(base, page, handle, 0)
    with pytest.raises(BackendError, match="run-map of 3 pages"):
        backend.map(base + page, 3 * page, handle, page)
    backend.map(base + page, 3 * page, handle, page)
    assert backend.calls["map"] == 3 and backend.pending_faults == {}
    backend.unmap(base + page, 3 * page)
    backend.unmap(base, page)
    backend.release(base, 8 * page)


def test_a_run_unmapped_whole_drops_its_contents_and_faults_again():
    page = 64 * 1024
    backend = HostBackend(page)
    base = backend.reserve(4 * page)
    chunk = backend.create_chunk(4 * page)
    backend.map(base, 3 * page, chunk, page)
    backend.set_access(base, 3 * page)
    view = backend.tensor(base, 4 * page)
    view[: 3 * page] = 9
    backend.unmap(base, 3 * page)
    backend.map(base, 3 * page, chunk, page)
    backend.set_access(base, 3 * page)
    assert int(view[: 3 * page].sum()) == 0
    backend.unmap(base, 3 * page)
    backend.destroy_chunk(chunk)
    backend.release(base, 4 * page)
