"""Moore-Hodgson prefill order (Prism Algorithm 2) and the online prefill speed estimate."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.prefill_order import PrefillSpeed, moore_hodgson, num_late


@dataclass(frozen=True)
class Job:
    name: str
    deadline_s: float
    duration_s: float


def deadline(job: Job) -> float:
    return job.deadline_s


def duration(job: Job) -> float:
    return job.duration_s


def test_hand_worked_example_drops_the_longest_job_and_runs_it_last():
    # By deadline: a (2, due 3), b (4, due 5) -> at 6 > 5 drop b (longest); c (1, due 6) -> 3;
    # d (3, due 7) -> 6; e (2, due 7) -> 8 > 7, drop d (longest of a, c, d, e).
    jobs = [Job("d", 7, 3), Job("a", 3, 2), Job("e", 7, 2), Job("b", 5, 4), Job("c", 6, 1)]
    result = moore_hodgson(jobs, 0.0, deadline, duration)
    assert [j.name for j in result.on_time] == ["a", "c", "e"]
    assert [j.name for j in result.late] == ["b", "d"]
    assert num_late(result.order, 0.0, deadline, duration) == 2
    assert num_late(sorted(jobs, key=deadline), 0.0, deadline, duration) == 4  # plain EDF: one late job makes all later ones late


def test_start_time_shifts_every_deadline_and_ties_keep_input_order():
    jobs = [Job("x", 10, 1), Job("y", 10, 1), Job("z", 10, 1)]
    assert [j.name for j in moore_hodgson(jobs, 0.0, deadline, duration).order] == ["x", "y", "z"]
    late_start = moore_hodgson(jobs, 8.5, deadline, duration)  # only one fits before 10
    assert len(late_start.on_time) == 1 and len(late_start.late) == 2


def test_jobs_without_deadline_are_never_late_and_go_after_those_with_one():
    jobs = [Job("no-slo", float("inf"), 5), Job("slo", 2, 1)]
    result = moore_hodgson(jobs, 0.0, deadline, duration)
    assert [j.name for j in result.on_time] == ["slo", "no-slo"] and result.late == []


jobs_strategy = st.lists(
    st.builds(
        Job,
        name=st.just(""),
        deadline_s=st.integers(0, 30).map(float),
        duration_s=st.integers(1, 10).map(float),
    ),
    max_size=7,
)


@settings(max_examples=300, deadline=None)
@given(jobs=jobs_strategy, now=st.integers(0, 5).map(float))
def test_misses_no_more_deadlines_than_the_best_permutation(jobs, now):
    result = moore_hodgson(jobs, now, deadline, duration)
    best = min((num_late(p, now, deadline, duration) for p in itertools.permutations(jobs)), default=0)
    assert num_late(result.order, now, deadline, duration) == best
    assert num_late(result.on_time, now, deadline, duration) == 0  # every kept job is on time
    assert sorted(map(id, result.order)) == sorted(map(id, jobs))  # a permutation: nothing lost or doubled


def test_prefill_speed_starts_at_the_prior_and_follows_measurements():
    speed = PrefillSpeed(prior_tokens_per_s=1000.0, alpha=0.5, min_tokens=16)
    assert speed.predict_s("m", 500) == pytest.approx(0.5)
    speed.observe("m", 3000, 1.0)
    assert speed.tokens_per_s("m") == pytest.approx(2000.0)
    speed.observe("m", 3000, 1.0)
    assert speed.tokens_per_s("m") == pytest.approx(2500.0)
    assert speed.tokens_per_s("other") == 1000.0  # per model


def test_prefill_speed_ignores_tiny_and_zero_time_steps():
    speed = PrefillSpeed(prior_tokens_per_s=1000.0, min_tokens=16)
    speed.observe("m", 4, 0.0001)  # per-step overhead would dominate: 40k tokens/s is not a speed
    speed.observe("m", 1000, 0.0)
    assert speed.tokens_per_s("m") == 1000.0
    with pytest.raises(ValueError):
        PrefillSpeed(prior_tokens_per_s=0.0)
