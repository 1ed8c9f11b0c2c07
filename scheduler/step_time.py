"""Predicted device time of one model's step, learned online.

The local scheduler uses it to decide whether another model's step can run while one model's step is
on the device without making that model late for its next step (`LocalScheduler`, overlapped steps).

A step costs a fixed part, about one read of the model's weights (a decode step's time: on a
memory-bound device it hardly depends on the batch), plus its prefill tokens at the model's prefill
speed (`PrefillSpeed`). The fixed part is an EWMA of the device time of steps that prefill nothing;
until the first such step it is 0 (an unknown model predicts only its prefill time). Prefill speed is
measured on whole steps, fixed part included, so predictions err long.
"""

from __future__ import annotations

from scheduler.prefill_order import PrefillSpeed


class StepTime:
    def __init__(self, prefill_speed: PrefillSpeed, alpha: float = 0.2):
        if not 0 < alpha <= 1:
            raise ValueError("need 0 < alpha <= 1")
        self.prefill_speed = prefill_speed
        self.alpha = alpha
        self._fixed_s: dict[str, float] = {}

    def observe(self, model: str, num_prefill_tokens: int, device_s: float) -> None:
        """Record one step of `model`: its prefill tokens and its device seconds."""
        self.prefill_speed.observe(model, num_prefill_tokens, device_s)
        if num_prefill_tokens == 0 and device_s > 0:
            previous = self._fixed_s.get(model, device_s)
            self._fixed_s[model] = previous + self.alpha * (device_s - previous)

    def fixed_s(self, model: str) -> float:
        return self._fixed_s.get(model, 0.0)

    def predict_s(self, model: str, num_prefill_tokens: int) -> float:
        """Predicted device seconds of a step of `model` that prefills `num_prefill_tokens`."""
        prefill_s = self.prefill_speed.predict_s(model, num_prefill_tokens) if num_prefill_tokens else 0.0
        return self.fixed_s(model) + prefill_s
