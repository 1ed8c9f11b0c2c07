"""The local (per-device) scheduler: one queue for all co-located models, one step plan at a time.

Every step it picks one model (iteration-level time sharing of the device) and forms that model's batch:
running sequences first (decodes, then unfinished prefill chunks), then waiting ones admitted in the
policy's order while the token budget, the sequence cap and the KV memory allow (chunked prefill: a
long prompt takes several steps). A sequence is admitted only when its KV blocks can be allocated; when
a running sequence cannot grow, the policy's victim among the model's running sequences is preempted
(its blocks freed; it is recomputed later), so that nothing is lost. A victim that was already given a
chunk in this step loses that chunk: a planned chunk always has its blocks.

The policy (`local_policy.py`) decides which model runs, admission order and victims: `prism` (default:
urgency across models, Moore-Hodgson over TTFT deadlines, longest-remaining-decode victim) or `fcfs`
(round-robin, FIFO, newest victim). Deadlines need the current time: `schedule(now)` and `update(plan,
sampled, now)` take it, defaulting to the injected `clock`. The clock must be the one `arrival_s` and
`ttft_deadline_s` are stamped with: the controller stamps wall-clock `time.time()`, hence the default.
`update` also measures each step's prefill speed (time between `schedule` and `update`) so that
predicted prefill times follow the device.

Pure logic: no I/O, no torch; block allocation goes through the `KVAllocator` each model registers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from scheduler.local_policy import DEFAULT_TPOT_TARGET, LocalPolicy, PickModel, make_local_policy, round_robin
from scheduler.prefill_order import PrefillSpeed
from scheduler.sequence import Sequence, SeqStatus

__all__ = ["KVAllocator", "LocalScheduler", "ModelQueue", "PickModel", "ScheduledChunk", "StepPlan", "round_robin"]


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
    ttft_slo_s: float
    tpot_slo_s: float
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


class LocalScheduler:
    def __init__(
        self,
        pick_model: str | PickModel = "prism",
        *,
        clock: Callable[[], float] = time.time,
        prefill_speed: PrefillSpeed | None = None,
        tpot_target: str = DEFAULT_TPOT_TARGET,
    ):
        """`pick_model`: a policy name (`prism`, `fcfs`) or a legacy model-order callable (FCFS otherwise);
        `tpot_target`: what the prism policy holds decodes' TPOT SLO to (`token`, `request`)."""
        self.queues: dict[str, ModelQueue] = {}
        self.clock = clock
        self.prefill_speed = prefill_speed if prefill_speed is not None else PrefillSpeed()
        self.policy: LocalPolicy = make_local_policy(pick_model, self.prefill_speed, tpot_target)
        self.num_steps = 0
        self._by_req_id: dict[str, Sequence] = {}
        self._in_flight: dict[str, float] = {}  # model whose step is running -> when it was planned

    # --- models and requests ----------------------------------------------------------------------

    def add_model(self, queue: ModelQueue) -> None:
        if queue.name in self.queues:
            raise ValueError(f"model {queue.name!r} is already scheduled here")
        self.queues[queue.name] = queue

    def remove_model(self, name: str) -> list[Sequence]:
        """Stop scheduling a model; return its unfinished sequences (blocks freed) for the caller to fail."""
        queue = self.queues.pop(name)
        self._in_flight.pop(name, None)
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
        return bool(self._in_flight) or any(q.has_work for q in self.queues.values())

    def in_flight(self, model: str) -> bool:
        """True between `schedule` returning a plan for `model` and `update` of that plan."""
        return model in self._in_flight

    def num_unfinished(self, model: str | None = None) -> int:
        queues = [self.queues[model]] if model else self.queues.values()
        return sum(len(q.waiting) + len(q.running) for q in queues)

    # --- one step ---------------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> StepPlan | None:
        """Plan the next step, or None when no model has work that can run now.

        A model whose last plan has not been `update`d yet (its step is still running) is skipped: its
        next step needs that step's tokens. Other models can be planned meanwhile, so a worker may run
        one model's step while it prepares another's.
        """
        now = self.clock() if now is None else now
        order = self.policy.order(list(self.queues.values()), self.num_steps, now)
        for queue in order.models:
            if queue.name in self._in_flight:
                continue
            plan = self._plan_model(queue, order.admission.get(queue.name, []), now)
            if plan.chunks or plan.rejected:
                return self._started(queue, plan, now)
        plan = self._break_memory_deadlock(now)
        return None if plan is None else self._started(self.queues[plan.model], plan, now)

    def update(self, plan: StepPlan, sampled: dict[str, int], now: float | None = None, device_s: float | None = None) -> list[Sequence]:
        """Apply a step's results: advance computed tokens, append sampled ones; return finished sequences.

        `device_s`: the step's own time on the device, if measured (else the time since it was planned)."""
        now = self.clock() if now is None else now
        planned_s = self._in_flight.pop(plan.model, now)
        self._observe_speed(plan, device_s if device_s is not None else now - planned_s)
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
            if seq.first_token_s is None:
                seq.first_token_s = now
            seq.last_token_s = now
            reason = seq.append_token(token)
            if reason is not None:
                queue.running.remove(seq)
                self._release(queue, seq)
                seq.finish_reason = reason
                finished.append(seq)
        return finished

    # --- internals --------------------------------------------------------------------------------

    def _plan_model(self, queue: ModelQueue, admission: list[Sequence], now: float) -> StepPlan:
        batch = _Batch(queue.max_num_batched_tokens)
        preempted: list[Sequence] = []
        rejected: list[Sequence] = []
        # Running sequences: decodes (one token) come first, then unfinished prefills.
        for seq in sorted(queue.running, key=lambda s: s.is_prefilling):
            if batch.budget <= 0 or seq.status is not SeqStatus.RUNNING:
                continue
            num_new = min(seq.num_uncomputed_tokens, batch.budget)
            preempted += self._make_room(queue, seq, num_new, batch, now)
            if seq.status is SeqStatus.RUNNING:
                batch.add(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
        # Waiting sequences, in the policy's order, while budget, cap and memory allow.
        for seq in admission:
            if batch.budget <= 0 or len(queue.running) >= queue.max_num_seqs or preempted:
                break
            if queue.blocks_needed(seq, min(seq.num_tokens + 1, seq.max_model_len)) > queue.allocator.max_blocks:
                queue.waiting.remove(seq)
                self._release(queue, seq)
                seq.finish_reason = "error"
                rejected.append(seq)
                continue
            num_new = min(seq.num_uncomputed_tokens, batch.budget)
            if not self._grow(queue, seq, num_new):
                break  # admission by memory: the most urgent waits until blocks are freed, nobody jumps it
            queue.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            queue.running.append(seq)
            batch.add(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
        return StepPlan(queue.name, list(batch.chunks.values()), preempted, rejected)

    def _make_room(self, queue: ModelQueue, seq: Sequence, num_new: int, batch: _Batch, now: float) -> list[Sequence]:
        """Grow `seq` by `num_new` tokens, preempting the policy's victims until it fits (or it is the victim)."""
        preempted: list[Sequence] = []
        while not self._grow(queue, seq, num_new):
            victim = self.policy.victim(list(queue.running), now)
            batch.drop(victim)  # its blocks are about to be freed: it must not run this step
            self._preempt(queue, victim)
            preempted.append(victim)
            if victim is seq:
                break
        return preempted

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

    def _break_memory_deadlock(self, now: float) -> StepPlan | None:
        """No model could run: memory is held by other models' stalled sequences. Preempt the policy's victim.

        Not while a step is running: it may finish sequences and free their memory."""
        if self._in_flight:
            return None
        stalled = [seq for q in self.queues.values() for seq in q.running]
        if not stalled:
            return None
        victim = self.policy.victim(stalled, now)
        self._preempt(self.queues[victim.model], victim)
        return StepPlan(victim.model, [], [victim], [])

    def _started(self, queue: ModelQueue, plan: StepPlan, now: float) -> StepPlan:
        queue.last_step = self.num_steps
        self.num_steps += 1
        self._in_flight[queue.name] = now
        return plan

    def _observe_speed(self, plan: StepPlan, elapsed_s: float) -> None:
        """Learn prefill speed from the step just run: its prefill tokens over its device time (else the
        time since it was planned).

        Decodes batched into the same step make the estimate slightly pessimistic, which errs on the side
        of starting prefills early.
        """
        num_prefill = sum(c.num_new_tokens for c in plan.chunks if c.start < c.seq.num_prompt_tokens)
        self.prefill_speed.observe(plan.model, num_prefill, elapsed_s)


class _Batch:
    """The chunks of the step being formed (insertion-ordered) and the token budget left."""

    def __init__(self, budget: int):
        self.chunks: dict[Sequence, ScheduledChunk] = {}
        self.budget = budget

    def add(self, chunk: ScheduledChunk) -> None:
        self.chunks[chunk.seq] = chunk
        self.budget -= chunk.num_new_tokens

    def drop(self, seq: Sequence) -> None:
        chunk = self.chunks.pop(seq, None)
        if chunk is not None:
            self.budget += chunk.num_new_tokens
