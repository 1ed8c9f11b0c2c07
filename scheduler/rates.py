"""Sliding-window rates per model: what the global scheduler reads to place, activate and evict models.

Prism's placement needs each model's token rate (prompt tokens of newly admitted requests plus decode
tokens, per second) over a recent window (60 s works); eviction needs the request rate and the time of
the last arrival to estimate the chance of a near re-arrival. Time is passed in, so the same tracker
runs live (controller clock) and in the simulator.

Events are summed into buckets of `bucket_s` seconds, so memory is bounded by window_s / bucket_s
entries per series whatever the load, and every update is O(1) amortised (append or merge into the
newest bucket; expire from the front). The price is that the window edge is fuzzy by up to one bucket.
Rates divide by the full window, not by the time since the model was first seen: a model that just
received its first request has a low rate, which is the conservative reading for placement (it should
not trigger a migration on one request) and for eviction cost (one arrival says little).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class SlidingWindowSum:
    """Sum of amounts added within the last `window_s` seconds, in buckets of `bucket_s` seconds."""

    def __init__(self, window_s: float, bucket_s: float):
        if window_s <= 0 or bucket_s <= 0 or bucket_s > window_s:
            raise ValueError(f"need 0 < bucket_s <= window_s, got bucket_s={bucket_s}, window_s={window_s}")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._buckets: deque[list[float]] = deque()  # [bucket start time, amount]
        self._total = 0.0

    def add(self, now: float, amount: float = 1.0) -> None:
        if self._buckets and now - self._buckets[-1][0] < self.bucket_s:
            self._buckets[-1][1] += amount
        else:
            self._buckets.append([now, amount])
        self._total += amount
        self._expire(now)

    def total(self, now: float) -> float:
        self._expire(now)
        return max(self._total, 0.0)  # float drift from subtractions must not read as negative

    def rate(self, now: float) -> float:
        """Amount per second over the window."""
        return self.total(now) / self.window_s

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._buckets and self._buckets[0][0] <= horizon:
            self._total -= self._buckets.popleft()[1]
        if not self._buckets:
            self._total = 0.0  # reset accumulated float error whenever the window empties


@dataclass(frozen=True)
class ModelRates:
    """A model's load over the recent window (per second), as the global scheduler sees it."""

    request_rate: float = 0.0
    prompt_token_rate: float = 0.0  # prompt tokens of newly admitted requests
    decode_token_rate: float = 0.0
    last_arrival_s: float | None = None

    @property
    def token_rate(self) -> float:
        """Tokens per second whose KV the model must hold: Prism's `token_rate` (prompt + decode)."""
        return self.prompt_token_rate + self.decode_token_rate

    def idle_s(self, now: float) -> float:
        """Seconds since the last arrival; infinite if the model never had one."""
        return float("inf") if self.last_arrival_s is None else max(0.0, now - self.last_arrival_s)


class _ModelWindows:
    def __init__(self, window_s: float, bucket_s: float):
        self.requests = SlidingWindowSum(window_s, bucket_s)
        self.prompt_tokens = SlidingWindowSum(window_s, bucket_s)
        self.decode_tokens = SlidingWindowSum(window_s, bucket_s)
        self.last_arrival_s: float | None = None


class RateTracker:
    """Per-model sliding-window statistics. Feed it arrivals and decoded tokens; read `rates(now, model)`."""

    def __init__(self, window_s: float = 60.0, bucket_s: float = 1.0):
        self.window_s = window_s
        self.bucket_s = min(bucket_s, window_s)
        self._models: dict[str, _ModelWindows] = {}

    def on_request(self, now: float, model: str, num_prompt_tokens: int) -> None:
        """A request for `model` was admitted (accepted by the controller) at `now`."""
        windows = self._windows(model)
        windows.requests.add(now, 1.0)
        windows.prompt_tokens.add(now, float(num_prompt_tokens))
        windows.last_arrival_s = now if windows.last_arrival_s is None else max(windows.last_arrival_s, now)

    def on_decode(self, now: float, model: str, num_tokens: int) -> None:
        """`model` produced `num_tokens` output tokens (summed over its requests) at `now`."""
        self._windows(model).decode_tokens.add(now, float(num_tokens))

    def rates(self, now: float, model: str) -> ModelRates:
        windows = self._models.get(model)
        if windows is None:
            return ModelRates()
        return ModelRates(
            request_rate=windows.requests.rate(now),
            prompt_token_rate=windows.prompt_tokens.rate(now),
            decode_token_rate=windows.decode_tokens.rate(now),
            last_arrival_s=windows.last_arrival_s,
        )

    def forget(self, model: str) -> None:
        """Drop a model's history (it was removed from the registry)."""
        self._models.pop(model, None)

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def _windows(self, model: str) -> _ModelWindows:
        windows = self._models.get(model)
        if windows is None:
            windows = self._models[model] = _ModelWindows(self.window_s, self.bucket_s)
        return windows
