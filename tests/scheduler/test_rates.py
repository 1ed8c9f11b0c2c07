"""Sliding-window rates: what counts, what expires, and bounded memory under load."""

from __future__ import annotations

import pytest

from scheduler.rates import ModelRates, RateTracker, SlidingWindowSum


def test_window_sum_expires_old_events():
    window = SlidingWindowSum(window_s=10.0, bucket_s=1.0)
    window.add(0.0, 5.0)
    window.add(4.0, 3.0)
    assert window.total(9.0) == 8.0
    assert window.total(10.5) == 3.0  # the event at 0 left the window
    assert window.rate(10.5) == pytest.approx(0.3)
    assert window.total(20.0) == 0.0


def test_window_memory_is_bounded_by_buckets_not_events():
    window = SlidingWindowSum(window_s=10.0, bucket_s=1.0)
    for i in range(100_000):
        window.add(i * 0.001, 1.0)  # 100 s of events, 1000 per second
    assert len(window._buckets) <= 11
    assert window.total(100.0) == pytest.approx(10_000, rel=0.11)  # fuzzy by at most one bucket


def test_tracker_reports_request_prompt_and_decode_rates():
    tracker = RateTracker(window_s=60.0)
    tracker.on_request(0.0, "a", num_prompt_tokens=600)
    tracker.on_request(30.0, "a", num_prompt_tokens=600)
    tracker.on_decode(40.0, "a", num_tokens=1200)
    rates = tracker.rates(45.0, "a")
    assert rates == ModelRates(request_rate=2 / 60, prompt_token_rate=20.0, decode_token_rate=20.0, last_arrival_s=30.0)
    assert rates.token_rate == 40.0
    assert rates.idle_s(45.0) == 15.0
    later = tracker.rates(75.0, "a")  # the first request left the window; the last arrival stays known
    assert later.request_rate == pytest.approx(1 / 60) and later.last_arrival_s == 30.0


def test_unknown_and_forgotten_models_have_zero_rates_and_infinite_idle_time():
    tracker = RateTracker()
    tracker.on_request(0.0, "a", 10)
    tracker.forget("a")
    assert tracker.rates(1.0, "a") == ModelRates()
    assert ModelRates().idle_s(5.0) == float("inf")
    with pytest.raises(ValueError):
        SlidingWindowSum(window_s=1.0, bucket_s=2.0)
