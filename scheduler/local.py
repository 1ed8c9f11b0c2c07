"""The local (per-device) scheduler: one queue for all co-located models, one step plan at a time.

Every step it picks one model (iteration-level time sharing of the device) and forms that model's batch:
running sequences first (decodes, then unfinished prefill chunks), then waiting ones admitted in queue
order while the token budget, the sequence cap and the KV memory allow (chunked prefill: a long prompt
takes several steps). A sequence is admitted only when its KV blocks can be allocated; when a running
sequence cannot grow, the newest running sequence of that model is preempted (its blocks freed; it is
recomputed later), so that nothing is lost and the older ones finish.

Which model runs is a policy (`pick_model`); the default here is round-robin among models with work.
Pure logic: no I/O, no torch; block allocation goes through the `KVAllocator` each model registers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from scheduler.sequence import Sequence, SeqStatus


class KVAllocator(Protocol):
    max_blocks: int

    def allocate(self, num_blocks: int) -> list[int] | None: ...

    def free(self, block_ids: list[int]) -> None: ...


@dataclass
class ModelQueue:
    name: str
    allocator: KVAllocator
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    priority: int = 0
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    last_step: int = -1

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position fed this step (== seq.num_computed_tokens when planned)
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence's known tokens, so a token is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan:
    model: str
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    rejected: list[Sequence]  # can never fit this model's KV space: finished with an error


PickModel = Callable[[list[ModelQueue], int], list[ModelQueue]]


def round_robin(queues: list[ModelQueue], step: int) -> list[ModelQueue]:
    """Models with work, least recently run first."""
    return sorted((q for q in queues if q.has_work), key=lambda q: (q.last_step, -q.priority))


class LocalScheduler:
    def __init__(self, pick_model: PickModel = round_robin):
        self.queues: dict[str, ModelQueue] = {}
        self.pick_model = pick_model
        self.num_steps = 0
        self._by_req_id: dict[str, Sequence] = {}

    # --- models and requests ----------------------------------------------------------------------

    def add_model(self, queue: ModelQueue) -> None:
        if queue.name in self.queues:
            raise ValueError(f"model {queue.name!r} is already scheduled here")
        self.queues[queue.name] = queue

    def remove_model(self, name: str) -> list[Sequence]:
        """Stop scheduling a model; return its unfinished sequences (blocks freed) for the caller to fail."""
        queue = self.queues.pop(name)
        orphans = list(queue.running) + list(queue.waiting)
        for seq in orphans:
            self._release(queue, seq)
        return orphans

    def add(self, seq: Sequence) -> None:
        queue = self.queues.get(seq.model)
        if queue is None:
            raise ValueError(f"model {seq.model!r} is not scheduled here")
        if seq.req_id in self._by_req_id:
            raise ValueError(f"request {seq.req_id!r} is already queued")
        queue.waiting.append(seq)
        self._by_req_id[seq.req_id] = seq

    def abort(self, req_id: str) -> Sequence | None:
        """Drop a request wherever it is and free its KV; None if it is unknown (already finished)."""
        seq = self._by_req_id.get(req_id)
        if seq is None:
            return None
        queue = self.queues[seq.model]
        if seq in queue.running:
            queue.running.remove(seq)
        else:
            queue.waiting.remove(seq)
        self._release(queue, seq)
        seq.finish_reason = "abort"
        return seq

    def has_work(self) -> bool:
        return any(q.has_work for q in self.queues.values())

    def num_unfinished(self, model: str | None = None) -> int:
        queues = [self.queues[model]] if model else self.queues.values()
        return sum(len(q.waiting) + len(q.running) for q in queues)

    # --- one step ---------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Plan the next step, or None when no model has work that can run now."""
        for queue in self.pick_model(list(self.queues.values()), self.num_steps):
            plan = self._plan_model(queue)
            if plan.chunks or plan.rejected:
                queue.last_step = self.num_steps
                self.num_steps += 1
                return plan
        return self._break_memory_deadlock()

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a step's results: advance computed tokens, append sampled ones; return finished sequences."""
        queue = self.queues[plan.model]
        finished = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens = chunk.start + chunk.num_new_tokens
            token = sampled.get(seq.req_id)
            if token is None:
                continue
            reason = seq.append_token(token)
            if reason is not None:
                queue.running.remove(seq)
                self._release(queue, seq)
                seq.finish_reason = reason
                finished.append(seq)
        return finished

    # --- internals --------------------------------------------------------------------------------

    def _plan_model(self, queue: ModelQueue) -> StepPlan:
        budget = queue.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        rejected: list[Sequence] = []
        # Running sequences: decodes (one token) come first, then unfinished prefills.
        running = sorted(queue.running, key=lambda s: s.is_prefilling)
        for seq in running:
            if budget <= 0 or seq.status is not SeqStatus.RUNNING:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self._grow(queue, seq, num_new):
                victim = queue.running[-1]
                self._preempt(queue, victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
                budget -= num_new
        # Waiting sequences, in queue order, while budget, cap and memory allow.
        while queue.waiting and budget > 0 and len(queue.running) < queue.max_num_seqs and not preempted:
            seq = queue.waiting[0]
            if queue.blocks_needed(seq, min(seq.num_tokens + 1, seq.max_model_len)) > queue.allocator.max_blocks:
                queue.waiting.popleft()
                self._release(queue, seq)
                seq.finish_reason = "error"
                rejected.append(seq)
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._grow(queue, seq, num_new):
                break  # admission by memory: wait until blocks are freed
            queue.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            queue.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
        return StepPlan(queue.name, chunks, preempted, rejected)

    def _grow(self, queue: ModelQueue, seq: Sequence, num_new: int) -> bool:
        needed = queue.blocks_needed(seq, seq.num_computed_tokens + num_new)
        if needed == 0:
            return True
        block_ids = queue.allocator.allocate(needed)
        if block_ids is None:
            return False
        seq.block_ids.extend(block_ids)
        return True

    def _preempt(self, queue: ModelQueue, seq: Sequence) -> None:
        queue.running.remove(seq)
        queue.allocator.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        queue.waiting.appendleft(seq)

    def _release(self, queue: ModelQueue, seq: Sequence) -> None:
        if seq.block_ids:
            queue.allocator.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SeqStatus.FINISHED
        self._by_req_id.pop(seq.req_id, None)

    def _break_memory_deadlock(self) -> StepPlan | None:
        """No model could run: memory is held by other models' stalled sequences. Preempt the newest one."""
        stalled = [(seq.arrival_s, q, seq) for q in self.queues.values() for seq in q.running]
        if not stalled:
            return None
        _, queue, victim = max(stalled, key=lambda item: item[0])
        self._preempt(queue, victim)
        return StepPlan(queue.name, [], [victim], [])
