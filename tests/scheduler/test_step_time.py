"""Step-time prediction: a fixed part learned from steps that prefill nothing, plus prefill at the model's speed."""

from __future__ import annotations

import pytest

from scheduler.prefill_order import PrefillSpeed
from scheduler.step_time import StepTime


def test_the_fixed_part_is_learned_from_decode_steps_and_prefill_adds_its_tokens_at_the_models_speed():
    times = StepTime(PrefillSpeed(prior_tokens_per_s=1000.0), alpha=0.5)
    assert times.predict_s("m", 0) == 0.0  # nothing measured yet
    times.observe("m", 0, 0.004)
    assert times.fixed_s("m") == pytest.approx(0.004)  # the first measurement, not blended with 0
    times.observe("m", 0, 0.008)
    assert times.fixed_s("m") == pytest.approx(0.006)
    assert times.predict_s("m", 500) == pytest.approx(0.006 + 0.5)
    assert times.predict_s("other", 500) == pytest.approx(0.5)


def test_a_prefill_step_updates_the_prefill_speed_and_not_the_fixed_part():
    speed = PrefillSpeed(prior_tokens_per_s=1000.0, alpha=1.0)
    times = StepTime(speed)
    times.observe("m", 0, 0.005)
    times.observe("m", 400, 0.1)
    assert times.fixed_s("m") == pytest.approx(0.005)
    assert speed.tokens_per_s("m") == pytest.approx(4000.0)
