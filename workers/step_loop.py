"""The step loop of one device: plan a step, launch it, then collect the step launched before it.

The models on a device are independent, so model B's step can be planned, its inputs staged and its
kernels queued while model A's step still runs on the GPU. With `overlap` on, the host's share of a
step (the local scheduler's decision, input staging, kernel launches, an eager prefill's many launches)
hides behind the device time of the step before, and the GPU does not wait for Python between models.
At most one step is in flight, and never two of the same model (the scheduler skips a model whose step
is running: its next step needs those tokens), so with one busy model this is the plain loop:
plan, run, apply.

`drain()` waits for the step in flight; the worker calls it before anything that frees or unmaps a
model's memory (an abort, an eviction, trimming idle KV pages), which must not happen under a running
kernel.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field

from scheduler.local import LocalScheduler, ModelQueue, StepPlan
from scheduler.sequence import Sequence
from workers.engine.engine import Engine, PendingStep

logger = logging.getLogger("prism.worker")


def model_queue(engine: Engine) -> ModelQueue:
    """The local scheduler's queue for an active engine's model: its limits, SLOs and KV allocator."""
    spec = engine.spec
    return ModelQueue(
        name=spec.name,
        allocator=engine.allocator,
        block_size=spec.block_size,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        ttft_slo_s=spec.ttft_slo_s,
        tpot_slo_s=spec.tpot_slo_s,
        priority=spec.priority,
    )


@dataclass
class StepOutcome:
    """A finished step: its plan, the sampled tokens, the sequences it finished; or the requests it failed."""

    plan: StepPlan
    sampled: dict[str, int] = field(default_factory=dict)
    finished: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # aborted because the engine raised


@dataclass
class StepCounts:
    """What one model's steps did so far: for operators (`/metrics`) and benchmarks, not for decisions."""

    steps: int = 0
    tokens: int = 0  # scheduled: prompt tokens prefilled plus one per decode
    preemptions: int = 0
    device_s: float = 0.0


@dataclass
class _Launched:
    plan: StepPlan
    pending: PendingStep


class StepLoop:
    def __init__(self, scheduler: LocalScheduler, engines: dict[str, Engine], overlap: bool = True):
        self.scheduler = scheduler
        self.engines = engines
        self.overlap = overlap
        self._in_flight: _Launched | None = None
        self.num_steps = 0
        self.num_overlapped = 0  # steps launched while another was still running
        self.counts: dict[str, StepCounts] = {}  # per model

    @property
    def device_busy_s(self) -> float:
        """The finished steps' device time, all models (host gaps inside a step included)."""
        return sum(c.device_s for c in self.counts.values())

    def advance(self) -> list[StepOutcome]:
        """Launch the next step if one can run, then finish the one launched before (if any)."""
        plan = self.scheduler.schedule()
        launched, failure = self._launch(plan) if plan is not None else (None, None)
        overlapped = launched is not None and self._in_flight is not None
        outcomes = [failure] if failure is not None else []
        outcomes += self.drain()
        if launched is not None:
            self.num_steps += 1
            self.num_overlapped += overlapped
            self._in_flight = launched
            if not self.overlap:
                outcomes += self.drain()
        return outcomes

    def drain(self) -> list[StepOutcome]:
        """Wait for the step in flight and apply it to the scheduler."""
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            return []
        plan = launched.plan
        try:
            sampled = launched.pending.result()
            device_s = launched.pending.device_s
        except Exception:
            return [self._fail(plan)]
        self._count(plan, device_s)
        return [StepOutcome(plan, sampled, self.scheduler.update(plan, sampled, device_s=device_s))]

    def _count(self, plan: StepPlan, device_s: float) -> None:
        counts = self.counts.setdefault(plan.model, StepCounts())
        counts.steps += 1
        counts.tokens += sum(c.num_new_tokens for c in plan.chunks)
        counts.preemptions += len(plan.preempted)
        counts.device_s += device_s

    def _launch(self, plan: StepPlan) -> tuple[_Launched | None, StepOutcome | None]:
        try:
            return _Launched(plan, self.engines[plan.model].launch(plan)), None
        except Exception:
            return None, self._fail(plan)

    def _fail(self, plan: StepPlan) -> StepOutcome:
        """An engine error fails this step's requests, not the worker; the scheduler forgets them."""
        req_ids = ",".join(c.seq.req_id for c in plan.chunks)
        logger.error("step of %s failed:\n%s", plan.model, traceback.format_exc(), extra={"req_id": req_ids, "model": plan.model})
        self.scheduler.update(plan, {})  # the step is over (nothing sampled); its model can be planned again
        failed = [c.seq for c in plan.chunks if self.scheduler.abort(c.seq.req_id) is not None]
        return StepOutcome(plan, failed=failed)
