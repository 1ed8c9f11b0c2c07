"""A bounded log of model lifecycle events (activations, evictions, failures) for the admin API and the log."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field

logger = logging.getLogger("prism.controller")


@dataclass(frozen=True)
class Event:
    kind: str  # activated | activation_failed | evicted | worker_exited | model_added | model_removed | ...
    model: str | None
    device: str | None
    duration_s: float | None = None
    detail: str = ""
    at: float = field(default_factory=time.time)


class EventLog:
    def __init__(self, capacity: int = 1000):
        self._events: deque[Event] = deque(maxlen=capacity)

    def add(self, kind: str, model: str | None = None, device: str | None = None, duration_s: float | None = None, detail: str = "") -> Event:
        event = Event(kind, model, device, duration_s, detail)
        self._events.append(event)
        took = f" in {duration_s:.3f} s" if duration_s is not None else ""
        logger.info("%s %s%s%s%s", kind, model or "", f" on {device}" if device else "", took, f" ({detail})" if detail else "")
        return event

    def recent(self, limit: int = 100, model: str | None = None) -> list[dict]:
        events = [e for e in self._events if model is None or e.model == model]
        return [asdict(e) for e in events[-limit:]]
