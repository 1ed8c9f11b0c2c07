"""The prism local policy: urgency across models, Moore-Hodgson admission, best-effort gap filling."""

from __future__ import annotations

import pytest

from scheduler.local_policy import FcfsPolicy, PrismPolicy
from scheduler.prefill_order import PrefillSpeed
from scheduler.sequence import Sequence, SeqStatus
from tests.scheduler.fakes import FakeClock, make_queue, make_scheduler, make_seq, run_step

NOW = 1000.0


def decoding(req_id: str, model: str, last_token_s: float, *, max_tokens: int = 50) -> Sequence:
    seq = make_seq(req_id, model=model, num_prompt=16, max_tokens=max_tokens, arrival_s=NOW - 5)
    seq.status, seq.output_token_ids, seq.num_computed_tokens = SeqStatus.RUNNING, [1], 16
    seq.first_token_s = seq.last_token_s = last_token_s
    return seq


def first_model(*queues, policy: str = "prism", tokens_per_s: float = 1000.0, ttft_margin: float = 0.0) -> str:
    speed = PrefillSpeed(tokens_per_s)
    chosen = PrismPolicy(speed, ttft_margin=ttft_margin) if policy == "prism" else FcfsPolicy()
    return chosen.order(list(queues), 0, NOW).models[0].name


def test_urgency_picks_the_model_with_the_nearest_ttft_deadline_round_robin_does_not():
    relaxed, urgent = make_queue("relaxed"), make_queue("urgent")
    relaxed.waiting.append(make_seq("r", model="relaxed", num_prompt=100, arrival_s=NOW, ttft_slo_s=2.0))
    urgent.waiting.append(make_seq("u", model="urgent", num_prompt=100, arrival_s=NOW - 0.5, ttft_slo_s=1.0))
    assert first_model(relaxed, urgent) == "urgent"
    assert first_model(relaxed, urgent, policy="fcfs") == "relaxed"


@pytest.mark.parametrize(
    ("prefill_deadline_s", "expected"),
    [
        (NOW + 1.0, "decoder"),  # prefill must start by NOW+0.9; the decode's next token is due at NOW+0.1
        (NOW + 0.15, "prefiller"),  # 100 tokens take 0.1 s: it must start by NOW+0.05, before the decode's
    ],
)
def test_decode_deadline_is_last_token_plus_tpot_and_a_prefill_must_start_by_deadline_minus_its_time(
    prefill_deadline_s, expected
):
    decoder, prefiller = make_queue("decoder", tpot_slo_s=0.2), make_queue("prefiller")
    decoder.running.append(decoding("d", "decoder", last_token_s=NOW - 0.1))
    seq = make_seq("p", model="prefiller", num_prompt=100, arrival_s=NOW)
    seq.ttft_deadline_s = prefill_deadline_s
    prefiller.waiting.append(seq)
    assert first_model(decoder, prefiller) == expected


def test_moore_hodgson_admission_serves_savable_requests_first_and_the_doomed_one_last():
    clock = FakeClock(NOW)
    queue = make_queue(max_num_seqs=1, max_num_batched_tokens=1024)
    scheduler = make_scheduler(queue, clock=clock, tokens_per_s=100.0)
    doomed = make_seq("doomed", num_prompt=100, max_tokens=1, arrival_s=NOW - 1.0, ttft_slo_s=1.2)  # 1 s, due +0.2
    long = make_seq("long", num_prompt=500, max_tokens=1, arrival_s=NOW, ttft_slo_s=10.0)  # 5 s, due +10
    urgent = make_seq("urgent", num_prompt=50, max_tokens=1, arrival_s=NOW, ttft_slo_s=1.0)  # 0.5 s, due +1
    for seq in (doomed, long, urgent):  # FCFS would serve them in this order and miss two deadlines
        scheduler.add(seq)

    finished_order = []
    while scheduler.has_work():
        plan, finished = run_step(scheduler)
        clock.advance(sum(c.num_new_tokens for c in plan.chunks) / 100.0)  # the device runs at the predicted speed
        finished_order += [(s.req_id, clock.now <= s.ttft_deadline_s) for s in finished]
    assert finished_order == [("urgent", True), ("long", True), ("doomed", False)]


@pytest.mark.parametrize(("savable_slo_s", "expected"), [(1.0, "savable"), (5.0, "late")])
def test_late_prefill_fills_slack_but_never_delays_savable_work_past_its_deadline(savable_slo_s, expected):
    late, savable = make_queue("late"), make_queue("savable")
    late.waiting.append(make_seq("l", model="late", num_prompt=100, arrival_s=NOW - 2, ttft_slo_s=1.0))  # already late
    savable.waiting.append(make_seq("s", model="savable", num_prompt=50, arrival_s=NOW, ttft_slo_s=savable_slo_s))
    # At 100 tokens/s the late request's step takes 1 s; the savable one (0.5 s of prefill) can spare
    # that only when its deadline is 5 s away.
    assert first_model(late, savable, tokens_per_s=100.0) == expected


@pytest.mark.parametrize(("last_token_s", "expected"), [(NOW, "no-slo"), (NOW - 1.0, "decoder")])
def test_prefill_without_deadline_runs_in_decode_slack_instead_of_starving(last_token_s, expected):
    decoder, no_slo = make_queue("decoder", tpot_slo_s=0.2), make_queue("no-slo")
    decoder.running.append(decoding("d", "decoder", last_token_s=last_token_s))
    no_slo.waiting.append(make_seq("n", model="no-slo", num_prompt=100, arrival_s=NOW))  # 0.1 s at 1000 tok/s
    assert first_model(decoder, no_slo) == expected


def test_every_model_with_work_is_offered_so_a_memory_blocked_one_does_not_idle_the_device():
    a, b, c = make_queue("a"), make_queue("b"), make_queue("c")
    a.waiting.append(make_seq("a1", model="a", ttft_slo_s=1.0))
    b.waiting.append(make_seq("b1", model="b"))  # no deadline
    c.running.append(decoding("c1", "c", last_token_s=NOW))
    order = PrismPolicy(PrefillSpeed()).order([a, b, c], 0, NOW)
    assert sorted(q.name for q in order.models) == ["a", "b", "c"]


def test_preempted_decodes_are_readmitted_before_fresh_prefills():
    queue = make_queue()
    fresh = make_seq("fresh", num_prompt=16, arrival_s=NOW, ttft_slo_s=0.5)
    resumed = decoding("resumed", "m", last_token_s=NOW - 0.1)
    resumed.status, resumed.num_computed_tokens = SeqStatus.WAITING, 0
    queue.waiting.extend([fresh, resumed])
    order = PrismPolicy(PrefillSpeed()).order([queue], 0, NOW)
    assert order.admission["m"] == [resumed, fresh]


def test_fcfs_alternates_models_round_robin():
    a, b = make_queue("a"), make_queue("b")
    scheduler = make_scheduler(a, b, policy="fcfs")
    scheduler.add(make_seq("a1", model="a", max_tokens=3))
    scheduler.add(make_seq("b1", model="b", max_tokens=3))
    models = [run_step(scheduler)[0].model for _ in range(6)]
    assert models == ["a", "b", "a", "b", "a", "b"]


def test_late_requests_do_not_starve_under_sustained_overload():
    """Regression (soak test, CPU): new on-time arrivals kept a sacrificed request waiting past 120 s.

    One sequence slot, a request that missed its deadline, and a fresh savable request arriving every
    step: Moore-Hodgson alone serves the fresh ones forever; after `max_wait_s` the old one goes first.
    """
    clock = FakeClock(NOW)
    queue = make_queue(max_num_seqs=1, max_num_batched_tokens=1024)
    scheduler = make_scheduler(queue, clock=clock, tokens_per_s=100.0)
    old = make_seq("old", num_prompt=100, max_tokens=1, arrival_s=NOW - 5.0, ttft_slo_s=1.0)  # already late
    scheduler.add(old)
    finished_at = None
    for step in range(1000):  # 0.1 s a step: 100 s of overload
        scheduler.add(make_seq(f"new{step}", num_prompt=10, max_tokens=1, arrival_s=clock.now, ttft_slo_s=1.0))
        plan, finished = run_step(scheduler)
        clock.advance(sum(c.num_new_tokens for c in plan.chunks) / 100.0)
        if any(s is old for s in finished):
            finished_at = clock.now
            break
    assert finished_at is not None, "the late request starved"
    max_wait_s = scheduler.policy.max_wait_s
    assert old.arrival_s + max_wait_s <= finished_at <= old.arrival_s + max_wait_s + 2.0


def test_the_ttft_margin_starts_a_prefill_early_instead_of_just_in_time():
    """Regression (H100 replay): prefills started at deadline minus predicted time missed on any jitter."""
    decoder, prefiller = make_queue("decoder", tpot_slo_s=0.2), make_queue("prefiller")
    prefiller.ttft_slo_s = 1.0
    decoder.running.append(decoding("d", "decoder", last_token_s=NOW - 0.1))  # next token due NOW+0.1
    seq = make_seq("p", model="prefiller", num_prompt=100, arrival_s=NOW)
    seq.ttft_deadline_s = NOW + 1.0  # 0.1 s of prefill: just in time it could start at NOW+0.9
    prefiller.waiting.append(seq)
    assert first_model(decoder, prefiller, ttft_margin=0.0) == "decoder"
    assert first_model(decoder, prefiller, ttft_margin=0.9) == "prefiller"  # must start by NOW+0.0: before the decode


def streaming(req_id: str, model: str, first_token_s: float, last_token_s: float, num_tokens: int) -> Sequence:
    seq = decoding(req_id, model, last_token_s, max_tokens=num_tokens + 50)
    seq.output_token_ids, seq.first_token_s = [1] * num_tokens, first_token_s
    return seq


def first_by_target(tpot_target: str, *queues) -> str:
    return PrismPolicy(PrefillSpeed(1000.0), tpot_target=tpot_target).order(list(queues), 0, NOW).models[0].name


def test_a_request_ahead_of_its_mean_tpot_waits_for_one_that_is_not():
    ahead, fresh = make_queue("ahead", tpot_slo_s=0.1), make_queue("fresh", tpot_slo_s=0.2)
    # 50 tokens since NOW-1: the mean stays within 0.1 s until the next token comes as late as NOW+4.
    ahead.running.append(streaming("a", "ahead", first_token_s=NOW - 1.0, last_token_s=NOW - 0.05, num_tokens=50))
    fresh.running.append(streaming("f", "fresh", first_token_s=NOW - 0.05, last_token_s=NOW - 0.05, num_tokens=1))  # due NOW+0.15
    assert first_by_target("token", ahead, fresh) == "ahead"  # its next token is due at NOW+0.05
    assert first_by_target("request", ahead, fresh) == "fresh"


def test_a_request_behind_its_mean_tpot_progresses_at_a_lower_rate():
    behind, other = make_queue("behind", tpot_slo_s=0.1), make_queue("other", tpot_slo_s=0.2)
    # 5 tokens since NOW-10: its mean misses 0.1 s whatever comes next; due at last + 5 x 0.1 = NOW+0.45.
    behind.running.append(streaming("b", "behind", first_token_s=NOW - 10.0, last_token_s=NOW - 0.05, num_tokens=5))
    other.running.append(streaming("o", "other", first_token_s=NOW - 0.1, last_token_s=NOW - 0.1, num_tokens=1))  # due NOW+0.1
    assert first_by_target("token", behind, other) == "behind"  # due NOW+0.05
    assert first_by_target("request", behind, other) == "other"
    other.running[0].last_token_s = NOW + 0.3  # now due NOW+0.5: the one behind still goes first, just later
    assert first_by_target("request", behind, other) == "behind"


def test_an_unknown_tpot_target_is_refused():
    with pytest.raises(ValueError, match="tpot_target"):
        PrismPolicy(PrefillSpeed(1000.0), tpot_target="frame")
