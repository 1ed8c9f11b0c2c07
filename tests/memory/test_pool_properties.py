"""Property-based: random sequences of allocate / free / trim / set_budget / weight activation and eviction
(with injected backend faults, run-maps included) over several KV spaces and weight spaces sharing one
pool, with physical memory in chunks of 4 pages and, as a control, of 1 page.

After every step: the pool's, the spaces' and the checking backend's books agree exactly (no page leaked,
no physical page in two places, every chunk's free pages right, per-model counts right, every unmap
exactly one whole mapping), every live block and weight is backed and holds what was written into it,
and mapped pages never grow past the budget. Each allocation is compared with a reference model of the
documented policy (ready blocks first, then the lowest ids; None exactly when the free pages and the
other spaces' idle pages, which the pool reclaims, cannot back it). Every mapping is one whole chunk (the
checking backend refuses anything else, as the H100's driver does): each aligned group of weights is one
chunk of its size, part of it cannot be unmapped, KV pages are one-page chunks mapped and unmapped one by
one. At the end every range is released and every chunk destroyed.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

from memory import BackendError, KVSpace
from tests.memory.checking_backend import make_rig
from tests.memory.weight_space import PoolExhaustedError, WeightSpace

KIB = 1024
PAGE = 16 * KIB
# (block bytes, max blocks, idle pages): a block smaller than a page, one straddling pages, one over two pages.
SPACES = {"small": (4 * KIB, 48, 2), "straddle": (6 * KIB, 40, 1), "large": (40 * KIB, 10, 0)}
WEIGHT_OWNERS = ("w1", "w2")
FAULT_OPERATIONS = ("create_chunk", "map", "map_run", "set_access")


class PoolMachine(RuleBasedStateMachine):
    CHUNK_PAGES = 4

    def __init__(self):
        super().__init__()
        self.rig = make_rig(page_bytes=PAGE, budget_pages=24, reserve_pages=3, chunk_pages=self.CHUNK_PAGES)
        self.spaces = {name: KVSpace(self.rig.pool, name, *shape) for name, shape in SPACES.items()}
        self.views = {name: s.tensor(torch.int32, (s.block_bytes // 4,)) for name, s in self.spaces.items()}
        self.live: dict[str, dict[int, int]] = {name: {} for name in SPACES}  # block id -> value written
        self.weights: dict[str, tuple[WeightSpace, torch.Tensor, int]] = {}
        self.next_value = 1
        self.last_mapped = 0

    # --- rules ----------------------------------------------------------------------------------

    @rule(name=st.sampled_from(sorted(SPACES)), num_blocks=st.integers(0, 14))
    def allocate(self, name, num_blocks):
        expected = self._predict(name, num_blocks)
        self._check_allocation(name, expected, self.spaces[name].allocate(num_blocks))

    @rule(
        name=st.sampled_from(sorted(SPACES)),
        num_blocks=st.integers(1, 14),
        operation=st.sampled_from(FAULT_OPERATIONS),
        nth=st.integers(1, 3),
    )
    def allocate_with_fault(self, name, num_blocks, operation, nth):
        space, rig = self.spaces[name], self.rig
        expected = self._predict(name, num_blocks)
        # Only this space must be as it was: the pool may have reclaimed other spaces' idle pages first.
        before = self._space_state(name)
        self._arm(operation, nth)
        try:
            block_ids = space.allocate(num_blocks)
        except BackendError:
            event("allocation hit an injected fault")
            assert self._space_state(name) == before, "a failed allocation left state behind"
            return
        finally:
            rig.faults.clear_faults()
        self._check_allocation(name, expected, block_ids)  # the fault never fired: an ordinary allocation

    @precondition(lambda self: any(self.live.values()))
    @rule(data=st.data())
    def free(self, data):
        name = data.draw(st.sampled_from(sorted(n for n, live in self.live.items() if live)))
        victims = data.draw(st.lists(st.sampled_from(sorted(self.live[name])), min_size=1, unique=True))
        self.spaces[name].free(victims)
        for b in victims:
            del self.live[name][b]

    @rule(name=st.sampled_from(sorted(SPACES)), keep=st.integers(0, 3))
    def trim(self, name, keep):
        space = self.spaces[name]
        idle_before = space.num_idle_pages
        unmapped = space.trim(keep)
        assert unmapped == max(0, idle_before - keep) and space.num_idle_pages == min(idle_before, keep)

    @rule(budget_pages=st.integers(4, 40))
    def set_budget(self, budget_pages):
        mapped = self.rig.pool.snapshot().pages_mapped
        if mapped > budget_pages:
            event("budget shrunk below the mapped pages")
        assert self.rig.pool.set_budget(budget_pages * PAGE) == max(0, mapped - budget_pages)

    @rule()
    def replenish_reserve(self):
        self.rig.pool.replenish_reserve()

    @rule(owner=st.sampled_from(WEIGHT_OWNERS), num_bytes=st.integers(1, 10 * PAGE))
    def activate_weights(self, owner, num_bytes):
        if owner in self.weights:
            return
        pool = self.rig.pool
        num_pages = -(-num_bytes // PAGE)
        fits = self._can_back(num_pages, exclude=None)
        before = pool.snapshot()
        try:
            space = WeightSpace(pool, owner, num_bytes)
        except PoolExhaustedError:
            event("weights refused")
            assert not fits, "refused weights that the free pages could back"
            after = pool.snapshot()
            assert (after.pages_mapped, after.weight_pages) == (before.pages_mapped, before.weight_pages)
            return
        assert fits, "accepted weights beyond the free pages"
        self._check_weight_runs(space)
        tensor = space.allocate((num_bytes,), torch.uint8)
        assert tensor.data_ptr() % 256 == 0 and space.num_bytes_used == num_bytes
        value = self.next_value % 251 + 1
        tensor.fill_(value)
        self.weights[owner] = (space, tensor, value)
        self.next_value += 1

    @rule(
        owner=st.sampled_from(WEIGHT_OWNERS),
        num_pages=st.integers(1, 10),
        operation=st.sampled_from(FAULT_OPERATIONS),
        nth=st.integers(1, 3),
    )
    def activate_weights_with_fault(self, owner, num_pages, operation, nth):
        if owner in self.weights:
            return
        pool = self.rig.pool
        before = pool.snapshot()
        self._arm(operation, nth)
        try:
            space = WeightSpace(pool, owner, num_pages * PAGE)
        except (BackendError, PoolExhaustedError) as error:
            event(f"weights failed: {type(error).__name__}")
            after = pool.snapshot()  # other spaces' idle pages may have been reclaimed before the fault
            assert after.weight_pages == before.weight_pages and after.pages_mapped <= before.pages_mapped
            assert not self.rig.checker.reservations.keys() - self._live_bases(), "the failed range was released"
            return
        finally:
            self.rig.faults.clear_faults()
        self._check_weight_runs(space)
        tensor = space.allocate((num_pages * PAGE,), torch.uint8)
        tensor.fill_(self.next_value % 251 + 1)
        self.weights[owner] = (space, tensor, self.next_value % 251 + 1)
        self.next_value += 1

    @precondition(lambda self: self._owners_with_long_runs())
    @rule(data=st.data())
    def unmapping_part_of_a_weight_run_is_refused(self, data):
        owner = data.draw(st.sampled_from(self._owners_with_long_runs()))
        space = self.weights[owner][0]
        page = data.draw(st.integers(0, space.vrange.handles[0][0].num_pages - 1))
        before = self.rig.pool.snapshot()
        with pytest.raises(ValueError, match="one run"):
            self.rig.pool.unmap_pages(space.vrange, [page])
        assert self.rig.pool.snapshot() == before
        event("part of a weight run refused")

    @precondition(lambda self: self.weights)
    @rule(data=st.data())
    def evict_weights(self, data):
        owner = data.draw(st.sampled_from(sorted(self.weights)))
        space, _, _ = self.weights.pop(owner)
        space.close()
        assert self.rig.pool.pages_of(owner, "weights") == 0

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def books_agree(self):
        rig = self.rig
        rig.assert_consistent()
        snap = rig.pool.snapshot()
        for name, space in self.spaces.items():
            space.audit()
            assert space.num_used_blocks == len(self.live[name])
            assert snap.kv_pages.get(name, 0) == space.num_mapped_pages
        for owner, (space, _, _) in self.weights.items():
            assert snap.weight_pages.get(owner, 0) == space.num_pages

    @invariant()
    def mapped_pages_never_grow_past_the_budget(self):
        snap = self.rig.pool.snapshot()
        assert snap.pages_mapped <= max(snap.budget_pages, self.last_mapped)
        self.last_mapped = snap.pages_mapped

    @invariant()
    def live_data_is_backed_and_intact(self):
        for name, live in self.live.items():
            space, view = self.spaces[name], self.views[name]
            for b, value in live.items():
                assert self.rig.checker.is_usable(space.vrange.base + b * space.block_bytes, space.block_bytes)
                assert bool((view[b] == value).all()), f"block {b} of {name} lost its data"
        for owner, (_, tensor, value) in self.weights.items():
            assert bool((tensor == value).all()), f"weights of {owner} lost their data"

    def teardown(self):
        self.views.clear()
        for space in self.spaces.values():
            space.close()
        for space, _, _ in self.weights.values():
            space.close()
        self.weights.clear()
        self.rig.pool.close()
        assert not self.rig.checker.chunks, "physical chunks leaked past close"
        assert not self.rig.checker.reservations, "address space leaked past close"

    # --- helpers --------------------------------------------------------------------------------

    def _arm(self, operation: str, nth: int) -> None:
        if operation == "map_run":
            self.rig.faults.fail_at("map", nth, min_pages=2)
        else:
            self.rig.faults.fail_at(operation, nth)

    def _owners_with_long_runs(self) -> list[str]:
        return sorted(o for o, (space, _, _) in self.weights.items() if space.vrange.handles[0][0].num_pages > 1)

    def _live_bases(self) -> set[int]:
        spaces = [s.vrange for s in self.spaces.values()] + [s.vrange for s, _, _ in self.weights.values()]
        return {vrange.base for vrange in spaces}

    def _check_weight_runs(self, space: WeightSpace) -> None:
        """Each aligned group of a chunk's worth of pages is one chunk of exactly its size, in order."""
        vrange, chunk_pages = space.vrange, self.CHUNK_PAGES
        chunks = []
        for start in range(0, vrange.num_pages, chunk_pages):
            size = min(chunk_pages, vrange.num_pages - start)
            chunk = vrange.handles[start][0]
            assert chunk.num_pages == size, "a group is not one chunk of its size"
            assert vrange.handles[start : start + size] == list(chunk.pages), "a group's pages are out of order"
            chunks.append(chunk)
        assert len(set(chunks)) == len(chunks)
        if len(chunks) > 1:
            event("weights in several chunks")

    # --- reference model ------------------------------------------------------------------------

    def _predict(self, name: str, num_blocks: int) -> set[int] | None:
        """The blocks the documented policy hands out, or None when the pool cannot back them."""
        space, live = self.spaces[name], self.live[name]
        free = [b for b in range(space.max_blocks) if b not in live]
        if num_blocks > len(free):
            return None
        ready = [b for b in free if all(space.vrange.is_mapped(p) for p in self._pages(space, b))]
        if num_blocks <= len(ready):
            return set(ready[:num_blocks])
        ready_set = set(ready)
        extra = [b for b in free if b not in ready_set][: num_blocks - len(ready)]
        pages = {p for b in extra for p in self._pages(space, b) if not space.vrange.is_mapped(p)}
        if not self._can_back(len(pages), exclude=name):
            return None
        return ready_set | set(extra)

    def _can_back(self, num_pages: int, exclude: str | None) -> bool:
        """Free pages, plus the idle pages of the other KV spaces (the pool reclaims them), suffice."""
        snap = self.rig.pool.snapshot()
        num_short = snap.pages_mapped + num_pages - snap.budget_pages
        idle_elsewhere = sum(s.num_idle_pages for n, s in self.spaces.items() if n != exclude)
        return num_short <= 0 or num_short <= idle_elsewhere

    def _space_state(self, name: str) -> tuple[int, ...]:
        space = self.spaces[name]
        pages = self.rig.pool.pages_of(name, "kv")
        return (pages, space.num_free_blocks, space.num_ready_blocks, space.num_mapped_pages)

    @staticmethod
    def _pages(space: KVSpace, block_id: int) -> range:
        start = block_id * space.block_bytes
        return range(start // PAGE, (start + space.block_bytes - 1) // PAGE + 1)

    def _check_allocation(self, name: str, expected: set[int] | None, block_ids: list[int] | None) -> None:
        if expected is None:
            event("allocation refused")
            assert block_ids is None, f"{name}: allocated {block_ids} where the policy says None"
            return
        assert block_ids is not None and len(block_ids) == len(set(block_ids)) == len(expected)
        assert set(block_ids) == expected, f"{name}: got {sorted(block_ids)}, policy says {sorted(expected)}"
        assert not set(block_ids) & set(self.live[name]), "handed out a live block"
        view = self.views[name]
        for b in block_ids:
            view[b] = self.next_value
            self.live[name][b] = self.next_value
            self.next_value += 1


class PagePerChunkMachine(PoolMachine):
    """The same properties with every page its own chunk: the pre-chunk pool's behaviour, as a control."""

    CHUNK_PAGES = 1


for machine in (PoolMachine, PagePerChunkMachine):
    machine.TestCase.settings = settings(
        max_examples=60,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
TestPoolMachine = PoolMachine.TestCase
TestPagePerChunkMachine = PagePerChunkMachine.TestCase
