"""Fakes at the true boundaries of the local scheduler: the KV allocator (a block counter) and the clock."""

from __future__ import annotations

from scheduler.local import LocalScheduler, ModelQueue, StepPlan
from scheduler.prefill_order import PrefillSpeed
from scheduler.sequence import Sequence


class FakeAllocator:
    """Hands out block ids from a fixed set; refuses (None) when too few are free, as the real one does."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._free = list(range(max_blocks - 1, -1, -1))
        self._used: set[int] = set()

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self._free):
            return None
        block_ids = [self._free.pop() for _ in range(num_blocks)]
        self._used.update(block_ids)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        assert set(block_ids) <= self._used, f"double free or foreign blocks: {block_ids}"
        self._used.difference_update(block_ids)
        self._free.extend(block_ids)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_queue(name: str = "m", max_blocks: int = 64, *, block_size: int = 16, max_num_seqs: int = 8,
               max_num_batched_tokens: int = 256, ttft_slo_s: float = 2.0, tpot_slo_s: float = 0.2) -> ModelQueue:
    return ModelQueue(name, FakeAllocator(max_blocks), block_size, max_num_seqs, max_num_batched_tokens, ttft_slo_s, tpot_slo_s)


def make_seq(req_id: str, model: str = "m", num_prompt: int = 16, *, max_tokens: int = 4, arrival_s: float = 1000.0,
             ttft_slo_s: float = float("inf")) -> Sequence:
    return Sequence(req_id, model, list(range(1, num_prompt + 1)), max_tokens, arrival_s, ttft_deadline_s=arrival_s + ttft_slo_s)


def make_scheduler(*queues: ModelQueue, policy: str = "prism", clock: FakeClock | None = None,
                   tokens_per_s: float = 1000.0) -> LocalScheduler:
    scheduler = LocalScheduler(policy, clock=clock or FakeClock(), prefill_speed=PrefillSpeed(tokens_per_s))
    for queue in queues:
        scheduler.add_model(queue)
    return scheduler


def run_step(scheduler: LocalScheduler, token: int = 7) -> tuple[StepPlan | None, list[Sequence]]:
    """Plan one step, 'sample' `token` wherever a chunk samples, apply it."""
    plan = scheduler.schedule()
    if plan is None:
        return None, []
    sampled = {c.seq.req_id: token for c in plan.chunks if c.samples}
    return plan, scheduler.update(plan, sampled)


def chunks_have_blocks(plan: StepPlan, block_size: int) -> bool:
    """Every planned chunk's positions are backed by the sequence's blocks (what the engine relies on)."""
    return all(len(c.seq.block_ids) * block_size >= c.start + c.num_new_tokens for c in plan.chunks)


class SharedPool:
    """One block budget shared by several models' allocators, like the device's page pool."""

    def __init__(self, num_blocks: int):
        self.num_free = num_blocks
        self.num_blocks = num_blocks
        self._next_id = 0

    def allocator(self) -> "SharedPool.Allocator":
        return SharedPool.Allocator(self)

    class Allocator:
        def __init__(self, pool: "SharedPool"):
            self.pool = pool
            self.max_blocks = pool.num_blocks

        def allocate(self, num_blocks: int) -> list[int] | None:
            if num_blocks > self.pool.num_free:
                return None
            self.pool.num_free -= num_blocks
            start, self.pool._next_id = self.pool._next_id, self.pool._next_id + num_blocks
            return list(range(start, start + num_blocks))

        def free(self, block_ids: list[int]) -> None:
            self.pool.num_free += len(block_ids)
            assert self.pool.num_free <= self.pool.num_blocks, "more blocks freed than allocated"
