"""Policies of the local scheduler: which model steps next, in which order each model admits its waiting
requests, and which running sequence gives its memory back under pressure.

`prism` (default) is DESIGN.md section 5, local level:
- One ordering of all prefills on the device, across models: Moore-Hodgson over TTFT deadlines
  (`prefill_order.py`). Each model admits its waiting requests in that order; requests that the
  ordering drops (they would miss anyway) come after the ones that can still make it.
- The model that steps next is the one whose most urgent work must start soonest: for a prefill that
  can still meet its TTFT, the deadline minus its predicted prefill time minus a safety margin (half
  the TTFT SLO by default, so prefills do not start just in time); for a decode, when its next token
  is due (a step's own time is small and similar across models, so it is left out). With
  `tpot_target="token"` that is the last token's time plus the model's TPOT SLO. With
  `"request"` (default) it follows the SLO's own definition, the mean gap over the request: a request ahead of
  its mean may wait until its next token would bring the mean to the SLO, and one already behind (its
  mean misses whatever comes next) progresses at `behind_factor` times the SLO, so that, as with
  Moore-Hodgson for TTFT, requests that miss anyway do not make others miss too.
  Prefills that are already late, or have no deadline, are best-effort: they run when the most
  urgent savable work can afford one of their steps, so they progress whenever slack exists and only
  wait under real overload (then they are exactly the requests Moore-Hodgson chose to sacrifice).
- No starvation: Moore-Hodgson sacrifices late requests, and under sustained overload new on-time
  arrivals would keep them waiting forever. A request that has waited `max_wait_s` for its first token
  is admitted first (oldest first) and makes its model the most urgent, so every request is served.
- Preemption victim: the running sequence with the longest remaining decode (newest on ties); it would
  hold and grow its blocks longest, and the ones close to done finish and free theirs.

`fcfs` is the simple baseline (and the behaviour before this policy existed): models round-robin,
least recently stepped first; FIFO admission; the newest arrival is preempted.

Policies return decisions as data (`StepOrder`, a victim); `LocalScheduler` carries them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from scheduler.prefill_order import PrefillSpeed, moore_hodgson
from scheduler.sequence import Sequence, SeqStatus

if TYPE_CHECKING:
    from scheduler.local import ModelQueue

POLICIES = ("prism", "fcfs")
TPOT_TARGETS = ("token", "request")
DEFAULT_TPOT_TARGET = "request"  # H200 replays: the same 99%-TTFT rate as token, 1.9x goodput at rate scale 20-24 (benchmarks/NOTES.md)

PickModel = Callable[[list["ModelQueue"], int], list["ModelQueue"]]
"""Legacy hook: given the queues and the step number, the models with work in the order to try them."""


@dataclass(frozen=True)
class StepOrder:
    models: list[ModelQueue]  # models to try, in order; the first with a runnable batch steps
    admission: dict[str, list[Sequence]]  # per model: its waiting sequences in admission order


class LocalPolicy(Protocol):
    name: str

    def order(self, queues: list[ModelQueue], step: int, now: float) -> StepOrder: ...

    def victim(self, candidates: list[Sequence], now: float) -> Sequence:
        """The sequence to preempt among running `candidates` (non-empty)."""
        ...


def round_robin(queues: list[ModelQueue], step: int) -> list[ModelQueue]:
    """Models with work, least recently run first."""
    return sorted((q for q in queues if q.has_work), key=lambda q: (q.last_step, -q.priority))


def newest_arrival(candidates: list[Sequence]) -> Sequence:
    # max() keeps the first maximum; reversed() makes ties go to the most recently admitted.
    return max(reversed(candidates), key=lambda s: s.arrival_s)


class FcfsPolicy:
    """Round-robin across models (or a custom `pick_model`), FIFO within a model, newest preempted."""

    name = "fcfs"

    def __init__(self, pick_model: PickModel = round_robin):
        self.pick_model = pick_model

    def order(self, queues: list[ModelQueue], step: int, now: float) -> StepOrder:
        return StepOrder(self.pick_model(queues, step), {q.name: list(q.waiting) for q in queues})

    def victim(self, candidates: list[Sequence], now: float) -> Sequence:
        return newest_arrival(candidates)


@dataclass(frozen=True)
class ModelUrgency:
    """Why a model is (not) next, as data: useful in tests and for explaining decisions."""

    queue: ModelQueue
    start_by_s: float  # latest start of its most urgent savable work; inf if it has none
    best_effort: Sequence | None  # its first best-effort prefill (late or without deadline), if any
    best_effort_step_s: float  # predicted time of one step of that prefill


class PrismPolicy:
    """Urgency across models, Moore-Hodgson within the device, longest-remaining-decode preemption."""

    name = "prism"

    def __init__(self, speed: PrefillSpeed, max_wait_s: float = 30.0, ttft_margin: float = 0.5, tpot_target: str = DEFAULT_TPOT_TARGET,
                 behind_factor: float = 5.0):
        if tpot_target not in TPOT_TARGETS:
            raise ValueError(f"unknown tpot_target {tpot_target!r}; expected one of {TPOT_TARGETS}")
        self.speed = speed
        self.max_wait_s = max_wait_s
        self.tpot_target = tpot_target
        self.behind_factor = behind_factor
        # Aim to finish a prefill this share of its TTFT SLO before the deadline: starting just in time
        # turns every misprediction of step times into a miss.
        self.ttft_margin = ttft_margin

    def order(self, queues: list[ModelQueue], step: int, now: float) -> StepOrder:
        # One pass over every queued sequence a step: this runs before every step, with hundreds queued
        # under load, so it reads fields directly instead of through properties.
        prefill_s: dict[Sequence, float] = {}  # predicted prefill seconds of those awaiting their first token
        decodes_start_by: dict[str, float] = {}  # model -> latest start of its most urgent decode
        by_request = self.tpot_target == "request"
        for queue in queues:
            per_token_s = 1.0 / self.speed.tokens_per_s(queue.name)
            tpot_slo_s = queue.tpot_slo_s
            next_due = math.inf  # when the running decodes' most urgent next token is due
            for seq in queue.running:
                if seq.output_token_ids:
                    due = (now if seq.last_token_s is None else seq.last_token_s) + tpot_slo_s
                    if by_request and seq.first_token_s is not None:
                        keeps_mean = seq.first_token_s + tpot_slo_s * len(seq.output_token_ids)
                        # On track: as late as keeps the mean within the SLO. Behind: at a lower rate.
                        due = max(due, keeps_mean) if keeps_mean >= now else due + (self.behind_factor - 1.0) * tpot_slo_s
                    if due < next_due:
                        next_due = due
                else:
                    prefill_s[seq] = (len(seq.prompt_token_ids) - seq.num_computed_tokens) * per_token_s
            preempted_start_by = math.inf
            for seq in queue.waiting:
                uncomputed_s = (seq.num_tokens - seq.num_computed_tokens) * per_token_s
                if seq.output_token_ids:  # a preempted decode: recomputed before its next token
                    last = now if seq.last_token_s is None else seq.last_token_s
                    preempted_start_by = min(preempted_start_by, last + queue.tpot_slo_s - uncomputed_s)
                else:
                    prefill_s[seq] = uncomputed_s
            decodes_start_by[queue.name] = min(next_due, preempted_start_by)
        ordering = moore_hodgson(prefill_s, now, _ttft_deadline, prefill_s.__getitem__)
        late = set(ordering.late)
        oldest_start = now - self.max_wait_s  # arrived at or before this: starving
        starving = sorted((s for s in prefill_s if s.arrival_s <= oldest_start), key=lambda s: s.arrival_s)
        admission: dict[str, list[Sequence]] = {q.name: [s for s in q.waiting if s.output_token_ids] for q in queues}
        for seq in [*starving, *(s for s in ordering.order if s.arrival_s > oldest_start)]:
            if seq.status is SeqStatus.WAITING:
                admission[seq.model].append(seq)
        by_model: dict[str, list[Sequence]] = {q.name: [] for q in queues}
        for seq in prefill_s:
            by_model[seq.model].append(seq)
        urgencies = {
            q.name: self.urgency(q, decodes_start_by[q.name], by_model[q.name], now, late, prefill_s)
            for q in queues if q.has_work
        }
        return StepOrder(self._model_order(list(urgencies.values()), now), admission)

    def victim(self, candidates: list[Sequence], now: float) -> Sequence:
        return max(reversed(candidates), key=lambda s: (s.max_tokens - s.num_output_tokens, s.arrival_s))

    def urgency(self, queue: ModelQueue, decodes_start_by_s: float, prefills: list[Sequence], now: float,
                late: set[Sequence], prefill_s: dict[Sequence, float]) -> ModelUrgency:
        """`decodes_start_by_s`: latest start of the model's most urgent decode, running or preempted (inf
        if none); `prefills`: its sequences awaiting their first token; `prefill_s`: their predicted seconds."""
        start_by = decodes_start_by_s
        best_effort: Sequence | None = None
        oldest_start = now - self.max_wait_s
        margin_s = self.ttft_margin * queue.ttft_slo_s
        for seq in prefills:
            if seq.arrival_s <= oldest_start:  # starving
                start_by = min(start_by, seq.arrival_s + self.max_wait_s)
            elif seq in late or math.isinf(seq.ttft_deadline_s):
                if best_effort is None or _deadline_key(seq) < _deadline_key(best_effort):
                    best_effort = seq
            else:
                start_by = min(start_by, seq.ttft_deadline_s - prefill_s[seq] - margin_s)
        if best_effort is None:
            return ModelUrgency(queue, start_by, None, 0.0)
        step_tokens = max(1, min(best_effort.num_uncomputed_tokens, queue.max_num_batched_tokens))
        return ModelUrgency(queue, start_by, best_effort, self.speed.predict_s(queue.name, step_tokens))

    def _model_order(self, urgencies: list[ModelUrgency], now: float) -> list[ModelQueue]:
        savable = sorted(
            (u for u in urgencies if math.isfinite(u.start_by_s)),
            key=lambda u: (u.start_by_s, u.queue.last_step, -u.queue.priority),
        )
        best_effort = sorted(
            (u for u in urgencies if u.best_effort is not None),
            key=lambda u: (u.best_effort.ttft_deadline_s, u.queue.last_step, -u.queue.priority),
        )
        order = [u.queue for u in savable]
        if best_effort:
            head = best_effort[0]
            # Fill slack: the most urgent savable work can wait one best-effort step without missing.
            if not savable or savable[0].start_by_s - now >= head.best_effort_step_s:
                order.insert(0, head.queue)
        # Every model with work stays in the list (after the urgent ones), so memory-blocked models
        # never leave the device idle while another could run.
        order += [u.queue for u in best_effort]
        return _unique(order)


def _ttft_deadline(seq: Sequence) -> float:
    return seq.ttft_deadline_s


def _deadline_key(seq: Sequence) -> tuple[float, float]:
    return seq.ttft_deadline_s, seq.arrival_s


def _unique(queues: list[ModelQueue]) -> list[ModelQueue]:
    seen: set[str] = set()
    result = []
    for queue in queues:
        if queue.name not in seen:
            seen.add(queue.name)
            result.append(queue)
    return result


def make_local_policy(pick_model: str | PickModel, speed: PrefillSpeed, tpot_target: str = DEFAULT_TPOT_TARGET) -> LocalPolicy:
    """A policy by name (`prism`, `fcfs`; `round_robin` is an alias of `fcfs`), or FCFS with a custom pick.
    `tpot_target`: what prism holds a decode's TPOT SLO to (`token` or `request`, see PrismPolicy)."""
    if callable(pick_model):
        return FcfsPolicy(pick_model)
    if pick_model == "prism":
        return PrismPolicy(speed, tpot_target=tpot_target)
    if pick_model in ("fcfs", "round_robin"):
        return FcfsPolicy()
    raise ValueError(f"unknown local scheduling policy {pick_model!r}; expected one of {POLICIES}")
