"""What the controller believes about one registry model: its state, its device, its requests.

This is the controller's side of residency, and it has one owner: the model manager's table of
runtimes (`ModelManager.runtimes`), changed only by the action executor and by the manager's repairs.
The worker's side is its device loop (`workers/device_loop.py`); the two are reconciled by every
heartbeat (`ModelManager._reconcile`). The requests of a model are counted here and nowhere else:
`num_waiting` for its activation, `num_running` on its worker.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from controller.catalog import CatalogEntry
from scheduler.cluster import ModelState

_UNCHANGED: Any = object()


@dataclass(eq=False)
class ModelRuntime:
    entry: CatalogEntry
    weight_bytes: int
    kv_bytes_per_token: int
    pinned: bool
    state: ModelState = ModelState.INACTIVE
    device: str | None = None
    kv_budget_bytes: int | None = None  # a fixed KV cap (static baseline); None: elastic
    waiting_since: list[float] = field(default_factory=list)  # arrivals (monotonic) of the requests waiting for it to become active, oldest first
    num_running: int = 0  # requests submitted to its worker
    activated_s: float | None = None
    retry_after_s: float = 0.0  # after a `no_memory` activation: no new attempt before this (monotonic)
    error: str | None = None  # why the last activation failed for good
    last_activation: dict = field(default_factory=dict)
    task: asyncio.Task | None = None  # the action in progress on it (activation, eviction, migration)
    activation_reason: str = ""  # who asked for its last activation ("request", "scheduler", "admin", ...)
    also_on: str | None = None  # a migration in flight: its destination until the switch, then its source until drained
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def num_waiting(self) -> int:
        return len(self.waiting_since)

    @property
    def num_in_flight(self) -> int:
        return self.num_waiting + self.num_running

    def set_state(self, state: ModelState, device: str | None = _UNCHANGED) -> None:
        """Change its state (and its device, when given), and wake everyone waiting on it."""
        self.state = state
        if device is not _UNCHANGED:
            self.device = device
        self.notify()

    def notify(self) -> None:
        """Wake everyone waiting on a change of this model's state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._changed.wait(), timeout_s)
