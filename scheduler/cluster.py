"""The global scheduler's input (a snapshot of devices and models) and output (actions), as plain data.

The controller builds a `ClusterState` from its registry, the workers' heartbeats and its rate tracker,
asks the `GlobalScheduler` for actions, and carries them out; the scheduler never touches a device.
Keeping both sides as frozen data is what lets the simulator and the live controller run the same
decisions, and lets the admin API show a dry run ("what happens if X is activated now").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Union

from scheduler.rates import ModelRates


class ModelState(str, enum.Enum):
    INACTIVE = "inactive"  # weights not on any device
    ACTIVATING = "activating"  # weights being loaded onto `device_id`
    ACTIVE = "active"
    EVICTING = "evicting"  # weights still on `device_id` until the eviction completes


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    memory_bytes: int  # bytes of this device's page pool, shared by models' weights and KV
    peer_access: bool = False  # GPU-to-GPU copies (NVLink / P2P): a migration copies instead of reloading


@dataclass(frozen=True)
class ModelInfo:
    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    tpot_slo_s: float
    ttft_slo_s: float
    pinned: bool = False  # never evicted or migrated
    device_id: str | None = None  # where its weights are (also while activating or evicting)
    state: ModelState = ModelState.INACTIVE
    rates: ModelRates = field(default_factory=ModelRates)
    compute_share: float = 0.0  # predicted fraction of a device's time its steps take at these rates
    num_inflight: int = 0  # requests accepted and not finished, including those waiting for activation
    kv_bytes_in_use: int = 0  # KV mapped for it now (worker heartbeat)
    preferred_device: str | None = None  # the registry's `device:`: chosen when it fits without evicting
    activated_s: float | None = None  # when it last became active: a fresh activation is not idle yet
    also_on: str | None = None  # a migration in flight: also booked here (its destination, then its source while it drains)
    waiting_s: float = 0.0  # how long its oldest request has waited for its activation (0: none waits)

    @property
    def demand(self) -> float:
        """Prism's weighted KV demand: token rate x KV bytes per token / TPOT SLO (bytes/s per second of SLO).

        A tight TPOT SLO weighs more: the same KV growth must be served with less queueing.
        """
        return self.rates.token_rate * self.kv_bytes_per_token / self.tpot_slo_s

    @property
    def is_resident(self) -> bool:
        """Its weights occupy `device_id` (loading, loaded, or not yet unloaded)."""
        return self.device_id is not None and self.state is not ModelState.INACTIVE

    def idle_for(self, now: float) -> float:
        """Seconds since its last arrival or activation, whichever is later."""
        since_activation = float("inf") if self.activated_s is None else now - self.activated_s
        return min(self.rates.idle_s(now), since_activation)

    def is_idle(self, now: float, idle_s: float) -> bool:
        """No request in flight, and neither an arrival nor an activation for `idle_s` seconds."""
        return self.num_inflight == 0 and self.idle_for(now) >= idle_s


@dataclass(frozen=True)
class ClusterState:
    devices: tuple[DeviceInfo, ...]
    models: tuple[ModelInfo, ...]

    @cached_property
    def _models_by_name(self) -> dict[str, ModelInfo]:
        return {m.name: m for m in self.models}

    def model(self, name: str) -> ModelInfo:
        try:
            return self._models_by_name[name]
        except KeyError:
            raise ValueError(f"model {name!r} is not in the cluster state") from None

    def resident_on(self, device_id: str) -> list[ModelInfo]:
        return [m for m in self.models if m.is_resident and m.device_id == device_id]


@dataclass(frozen=True)
class Activate:
    """Load `model`'s weights onto `device`; requests wait (counting TTFT) until it is active."""

    model: str
    device: str
    kv_budget_bytes: int | None = None  # None: KV shares the device's pool elastically; static sets a cap


@dataclass(frozen=True)
class Evict:
    """Unload `model` from `device`: its running requests are drained first (up to the drain timeout)."""

    model: str
    device: str
    reason: str


@dataclass(frozen=True)
class Migrate:
    """Move `model` from `src` to `dst`, make before break: the controller activates it on `dst` while
    `src` keeps serving it (the state shows it ACTIVE on `src`, `also_on=dst`), switches new requests to
    `dst` (ACTIVE on `dst`, `also_on=src`), lets the requests on `src` finish (up to
    `evict_drain_timeout_s`) and evicts it there. If `dst` cannot take it, it stays on `src`."""

    model: str
    src: str
    dst: str


Action = Union[Activate, Evict, Migrate]
