"""Settings, memory and interface shared by the placement policies (prism, static, swap)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.cluster import Action, ClusterState, ModelInfo
from scheduler.pressure import EvictionCost, PressureModel


@dataclass(frozen=True)
class PlacementConfig:
    """The global scheduler's settings. The operator's are built from the registry
    (`SchedulerConfig.placement`), where their defaults and meanings are declared once."""

    idle_evict_s: float
    max_idle_s: float | None
    migration_gain: float
    migration_cooldown_s: float
    max_models_per_device: int
    swap_keep_alive_s: float
    pressure: PressureModel
    eviction: EvictionCost
    kv_high_watermark: float = 0.9
    """A device whose KV in use passes this share of its non-weight memory needs memory: an idle model goes."""
    max_activation_wait_s: float | None = None
    """A model waiting this long for its activation may evict busy models (drained first); None: idle only."""


@dataclass
class PlacementHistory:
    """What the scheduler remembers between cycles: when each model last moved (for the cooldown)."""

    last_moved_s: dict[str, float] = field(default_factory=dict)

    def cooling_down(self, model: str, now: float, cooldown_s: float) -> bool:
        return now - self.last_moved_s.get(model, -math.inf) < cooldown_s


class PlacementPolicy(Protocol):
    name: str

    def plan(self, now: float, state: ClusterState, history: PlacementHistory) -> list[Action]:
        """Periodic decisions: pending activations, evictions, at most one migration."""
        ...

    def on_arrival(self, now: float, model: ModelInfo, state: ClusterState, history: PlacementHistory) -> list[Action]:
        """A request arrived for `model`: activate it if it is not resident (evicting if needed), or nothing."""
        ...

    def unplaced(self, name: str) -> bool:
        """Whether the policy will never place `name` (its requests are then refused at once)."""
        ...
