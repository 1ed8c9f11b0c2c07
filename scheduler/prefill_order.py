"""Prefill order by TTFT deadline (Prism Algorithm 2: Moore-Hodgson) and the prefill speed it relies on.

Waiting prefills on one device form a single-machine scheduling problem: each job has a deadline
(arrival + TTFT SLO) and a processing time (prompt tokens / the model's prefill speed). Moore and
Hodgson's algorithm (1968) minimises the number of late jobs: take jobs by deadline, and whenever the
running time passes the current job's deadline, drop the longest job taken so far. The kept jobs, in
deadline order, all finish on time; the dropped ones would have missed anyway, so they run after the
kept ones instead of making others miss too (running a doomed job first is how FCFS turns one miss
into many under load).

The predicted times come from `PrefillSpeed`, an online per-model estimate (EWMA of measured
tokens/s, starting from a prior) so that a model that prefills at 20k tokens/s and one at 2k tokens/s
are not treated alike.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PrefillOrder(Generic[T]):
    """Jobs in dispatch order: `on_time` by deadline (all meet it if run back to back), then `late`."""

    on_time: list[T]
    late: list[T]  # by deadline too: among the doomed, the oldest first keeps their lateness smallest

    @property
    def order(self) -> list[T]:
        return self.on_time + self.late


def moore_hodgson(
    jobs: Iterable[T],
    now: float,
    deadline: Callable[[T], float],
    duration: Callable[[T], float],
) -> PrefillOrder[T]:
    """Order jobs run back to back from `now` so that the fewest miss their (absolute) deadlines.

    Ties in deadline keep the input order, so the result is deterministic. O(n log n).
    """
    jobs = list(jobs)
    # (deadline, input position, duration), each key function called once per job.
    by_deadline = sorted((deadline(job), index, duration(job)) for index, job in enumerate(jobs))
    kept: list[tuple[float, int]] = []  # max-heap on duration: (-duration, rank in deadline order)
    dropped: list[int] = []
    finish = now
    for rank, (due_s, _, job_s) in enumerate(by_deadline):
        heapq.heappush(kept, (-job_s, rank))
        finish += job_s
        if finish > due_s:
            neg_longest, longest_rank = heapq.heappop(kept)
            finish += neg_longest
            dropped.append(longest_rank)
    on_time = [jobs[by_deadline[rank][1]] for rank in sorted(rank for _, rank in kept)]
    late = [jobs[by_deadline[rank][1]] for rank in sorted(dropped)]
    return PrefillOrder(on_time, late)


def num_late(order: Iterable[T], now: float, deadline: Callable[[T], float], duration: Callable[[T], float]) -> int:
    """How many jobs miss their deadline when run back to back in `order` from `now`."""
    finish, late = now, 0
    for job in order:
        finish += duration(job)
        late += finish > deadline(job)
    return late


class PrefillSpeed:
    """Per-model prefill throughput (tokens/s): an EWMA of measurements, starting at a prior.

    The prior matters only until the first measurement; `alpha` weighs each new measurement, so one
    outlier step (a first-call compilation, a CUDA-graph capture) moves the estimate by at most that
    fraction. Measurements of fewer than `min_tokens` tokens are ignored: tiny steps are dominated by
    fixed per-step overhead and would make long prompts look slower than they are.
    """

    def __init__(self, prior_tokens_per_s: float = 4096.0, alpha: float = 0.2, min_tokens: int = 16):
        if prior_tokens_per_s <= 0 or not 0 < alpha <= 1:
            raise ValueError("need prior_tokens_per_s > 0 and 0 < alpha <= 1")
        self.prior_tokens_per_s = prior_tokens_per_s
        self.alpha = alpha
        self.min_tokens = min_tokens
        self._tokens_per_s: dict[str, float] = {}

    def observe(self, model: str, num_tokens: int, elapsed_s: float) -> None:
        """Record that `model` prefilled `num_tokens` in `elapsed_s` seconds (one step)."""
        if num_tokens < self.min_tokens or elapsed_s <= 0:
            return
        measured = num_tokens / elapsed_s
        previous = self._tokens_per_s.get(model, self.prior_tokens_per_s)
        self._tokens_per_s[model] = previous + self.alpha * (measured - previous)

    def tokens_per_s(self, model: str) -> float:
        return self._tokens_per_s.get(model, self.prior_tokens_per_s)

    def predict_s(self, model: str, num_tokens: int) -> float:
        """Predicted seconds to prefill `num_tokens` of `model`."""
        return num_tokens / self.tokens_per_s(model)

    def forget(self, model: str) -> None:
        self._tokens_per_s.pop(model, None)
