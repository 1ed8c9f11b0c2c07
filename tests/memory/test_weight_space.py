"""WeightSpace: pages mapped up front (all or nothing), aligned bump allocation, eviction returns pages."""

from __future__ import annotations

import pytest
import torch

from memory import WEIGHT_ALIGNMENT_BYTES, BackendError, KVSpace, PoolExhaustedError, WeightSpace, weight_bytes_needed
from tests.memory.checking_backend import make_rig

PAGE = 16 * 1024
PARAMETERS = [((7, 3), torch.float32), ((5,), torch.bfloat16), ((33, 2, 2), torch.int8), ((0,), torch.float16)]


def test_weight_bytes_needed_matches_what_allocate_uses():
    needed = weight_bytes_needed(PARAMETERS)
    assert needed == 84 + (256 - 84 % 256) + 10 + (256 - 10 % 256) + 132 + (256 - 132 % 256)
    rig = make_rig(page_bytes=PAGE)
    space = WeightSpace(rig.pool, "m", needed)
    tensors = [space.allocate(shape, dtype) for shape, dtype in PARAMETERS]
    assert space.num_bytes_used == needed
    for (shape, dtype), tensor in zip(PARAMETERS, tensors, strict=True):
        assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
        assert tensor.data_ptr() % WEIGHT_ALIGNMENT_BYTES == 0
    with pytest.raises(ValueError, match="full"):
        space.allocate((1,), torch.uint8)


def test_views_are_distinct_and_hold_data_like_a_checkpoint_loader_writes_it():
    rig = make_rig(page_bytes=PAGE, budget_pages=16)
    shapes = [((300, 40), torch.float32), ((300,), torch.float32), ((64, 64), torch.bfloat16)]
    space = WeightSpace(rig.pool, "m", weight_bytes_needed(shapes))
    # LlamaModel.from_checkpoint fills fused weights with torch.cat(..., out=allocate(shape, dtype)).
    parts = [torch.full((100, 40), float(i)) for i in range(3)]
    fused = space.allocate((300, 40), torch.float32)
    torch.cat(parts, dim=0, out=fused)
    norm = space.allocate((300,), torch.float32)
    norm.copy_(torch.arange(300.0))
    embed = space.allocate((64, 64), torch.bfloat16)
    embed.fill_(-2.5)
    assert fused.data_ptr() + fused.nbytes <= norm.data_ptr() and norm.data_ptr() + norm.nbytes <= embed.data_ptr()
    assert torch.equal(fused, torch.cat(parts)) and torch.equal(norm, torch.arange(300.0))
    assert bool((embed == -2.5).all())
    assert rig.pool.snapshot().weight_pages == {"m": space.num_pages}


def test_weights_that_do_not_fit_raise_and_leave_nothing_mapped():
    rig = make_rig(page_bytes=PAGE, budget_pages=10)
    kv = KVSpace(rig.pool, "other", PAGE, 8)
    assert kv.allocate(4) is not None
    before = rig.pool.snapshot()
    with pytest.raises(PoolExhaustedError, match="7 pages"):
        WeightSpace(rig.pool, "m", 6 * PAGE + 1)
    assert rig.pool.snapshot() == before
    assert len(rig.checker.reservations) == 1, "the refused range was released"
    space = WeightSpace(rig.pool, "m", 6 * PAGE)
    assert rig.pool.num_free_pages == 0 and space.num_pages == 6
    rig.assert_consistent()


@pytest.mark.parametrize(
    "chunk_pages, operation, nth, min_pages",
    [
        (4, "map", 1, 2),  # the run-map of the first whole chunk
        (4, "map", 2, 1),  # the tail run, after a whole chunk was mapped
        (4, "create_chunk", 2, 1),
        (4, "set_access", 1, 1),
        (1, "map", 4, 1),  # one page per chunk: the fourth page
    ],
)
def test_backend_fault_while_mapping_weights_leaves_nothing_behind(chunk_pages, operation, nth, min_pages):
    rig = make_rig(page_bytes=PAGE, budget_pages=10, reserve_pages=0, chunk_pages=chunk_pages)
    rig.faults.fail_at(operation, nth, min_pages)
    with pytest.raises(BackendError):
        WeightSpace(rig.pool, "m", 6 * PAGE)
    assert not rig.faults.pending_faults, "the fault fired"
    assert rig.pool.snapshot().pages_mapped == 0 and not rig.checker.reservations
    assert not rig.checker.chunks, "chunks created for the failed call were destroyed (no reserve)"
    rig.assert_consistent()
    space = WeightSpace(rig.pool, "m", 6 * PAGE)
    assert space.num_pages == 6
    rig.assert_consistent()


def test_close_returns_every_page_to_other_models_at_once():
    rig = make_rig(page_bytes=PAGE, budget_pages=8)
    space = WeightSpace(rig.pool, "m", 8 * PAGE)
    kv = KVSpace(rig.pool, "n", PAGE, 8)
    assert kv.allocate(1) is None, "the weights hold the whole budget"
    space.close()
    space.close()
    assert space.closed and rig.pool.snapshot().weight_pages == {}
    assert kv.allocate(8) is not None
    with pytest.raises(ValueError, match="closed"):
        space.allocate((1,), torch.uint8)
    rig.assert_consistent()


@pytest.mark.parametrize("num_bytes", [0, -PAGE])
def test_empty_weight_space_is_misuse(num_bytes):
    rig = make_rig(page_bytes=PAGE)
    with pytest.raises(ValueError):
        WeightSpace(rig.pool, "m", num_bytes)
    assert not rig.checker.reservations
