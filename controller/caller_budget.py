"""Activations a caller may cause: a token bucket per caller, so one tenant cannot thrash a GPU for the others.

A request for a model that is neither active nor on its way (activating, or active somewhere else while it
migrates) makes the controller load it: a cold load of up to a few seconds of the device's PCIe link and
an eviction of somebody else's model. Each caller gets `per_minute` such loads a minute, and bursts of up to
`burst`; past that its requests for cold models get a 429 (`activation_budget_exceeded`, with Retry-After
until its next token), while its requests for models that are already there, and everybody else's, go on.

The caller is the API key it presented (hashed; never logged), or, where the server has no keys, the
client's address. Admin activations and the scheduler's own placement are not charged.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

MAX_CALLERS = 10_000  # buckets kept; the fullest (idlest) are forgotten first beyond this


@dataclass
class _Bucket:
    tokens: float
    updated_s: float


class ActivationBudget:
    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0 or burst < 1:
            raise ValueError(f"per_minute ({per_minute}) must be > 0 and burst ({burst}) >= 1")
        self.rate_per_s = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def charge(self, caller: str) -> float | None:
        """Take one activation from `caller`'s bucket: None if it had one, else the seconds until it will."""
        now = self.clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= MAX_CALLERS:
                self._forget_full(now)
            bucket = self._buckets[caller] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated_s) * self.rate_per_s)
        bucket.updated_s = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self.rate_per_s

    def _forget_full(self, now: float) -> None:
        full = [c for c, b in self._buckets.items() if b.tokens + (now - b.updated_s) * self.rate_per_s >= self.burst]
        for caller in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[caller]


def caller_of(api_key: str | None, client_host: str | None) -> str:
    """A caller's identity: its key's digest (the key itself is never kept), else its address."""
    if api_key is not None:
        return "key:" + hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"addr:{client_host or 'unknown'}"
