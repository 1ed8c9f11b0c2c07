"""Settings, memory and interface shared by the placement policies (prism, static, swap)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.cluster import Action, ClusterState, ModelInfo
from scheduler.pressure import EvictionCost, PressureModel


@dataclass(frozen=True)
class PlacementConfig:
    idle_evict_s: float = 45.0
    """A model idle this long may be evicted when memory is needed (Prism: < 40 s thrashes, > 80 s wastes)."""
    max_idle_s: float | None = None
    """Evict past this idle time even when no one needs the memory. None (default): never, because an idle
    model's weights cost nothing until memory is needed, and a reload costs a TTFT later."""
    migration_gain: float = 0.2
    """Hysteresis tau: a migration must lower the largest device pressure by this fraction."""
    migration_cooldown_s: float = 60.0
    """A model that moved (or was activated) is not migrated again for this long: one rate window, so
    that the rates that justify the next move were measured after the last one."""
    kv_high_watermark: float = 0.9
    """A device whose KV in use passes this share of its non-weight memory needs memory: an idle model goes."""
    pressure: PressureModel = field(default_factory=PressureModel)
    eviction: EvictionCost = field(default_factory=EvictionCost)
    max_models_per_device: int = 1
    """swap baseline: resident models per device (Ollama's OLLAMA_MAX_LOADED_MODELS, llama-swap groups)."""
    swap_keep_alive_s: float = 300.0
    """swap baseline: unload a model idle this long (Ollama's keep_alive default, 5 minutes)."""


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
