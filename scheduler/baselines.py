"""Baseline placement policies, in the same interface as prism's, for honest side-by-side comparisons.

- `static`: every model has its own device and a fixed KV share for good, as separate vLLM instances
  with `gpu_memory_utilization` splits. Models are assigned once, the first time the policy sees
  them: the registry's preferred device if it fits, else the device with the most memory left, larger
  models first. All assigned models are activated at once, whatever their traffic; nothing is ever
  evicted or migrated. A model that fits nowhere is never placed (`unplaced`): the controller fails its
  requests at once with a 503 saying so, as a request to an instance nobody started would fail.
- `swap`: load on demand with at most `max_models_per_device` resident per device, as Ollama or
  llama-swap. A request for a non-resident model takes a free slot, else unloads the least recently
  used model that has no request in flight; models idle for `swap_keep_alive_s` are unloaded.
"""

from __future__ import annotations

import dataclasses

from scheduler.cluster import Action, Activate, ClusterState, Evict, ModelInfo, ModelState
from scheduler.placement_config import PlacementConfig, PlacementHistory
from scheduler.pressure import Layout


class StaticPlacement:
    name = "static"

    def __init__(self, config: PlacementConfig):
        self.config = config
        self.assignment: dict[str, str] = {}  # model -> device, decided once
        self.kv_budget_bytes: dict[str, int] = {}
        self._reserved: dict[str, int] = {}  # device -> bytes promised (weights + KV shares)
        self._seen: set[str] = set()  # models the assignment has considered

    def plan(self, now: float, state: ClusterState, history: PlacementHistory) -> list[Action]:
        self._assign_new(state)
        return [self._activation(m) for m in state.models if m.state is ModelState.INACTIVE and m.name in self.assignment]

    def on_arrival(self, now: float, model: ModelInfo, state: ClusterState, history: PlacementHistory) -> list[Action]:
        self._assign_new(state)
        if model.state is not ModelState.INACTIVE or model.name not in self.assignment:
            return []
        return [self._activation(model)]

    def unplaced(self, name: str) -> bool:
        """Assigned no device for good (static partitioning gave the memory to the models that fit)."""
        return name in self._seen and name not in self.assignment

    def _activation(self, model: ModelInfo) -> Activate:
        return Activate(model.name, self.assignment[model.name], self.kv_budget_bytes[model.name])

    def _assign_new(self, state: ClusterState) -> None:
        """Split each device among the models first seen now: weights, then equal KV shares of the rest."""
        memory = {d.device_id: d.memory_bytes for d in state.devices}
        for device_id in memory:
            self._reserved.setdefault(device_id, 0)
        new = [m for m in state.models if m.name not in self.assignment]
        self._seen.update(m.name for m in new)
        placed: dict[str, list[ModelInfo]] = {d: [] for d in memory}
        for model in sorted(new, key=lambda m: (-m.weight_bytes, m.name)):
            device_id = self._device_for(model, memory, placed)
            if device_id is not None:
                placed[device_id].append(model)
        for device_id, models in placed.items():
            if not models:
                continue
            kv_share = (memory[device_id] - self._reserved[device_id] - sum(m.weight_bytes for m in models)) // len(models)
            for model in models:
                self.assignment[model.name] = device_id
                self.kv_budget_bytes[model.name] = kv_share
            self._reserved[device_id] += sum(m.weight_bytes for m in models) + kv_share * len(models)

    def _device_for(self, model: ModelInfo, memory: dict[str, int], placed: dict[str, list[ModelInfo]]) -> str | None:
        def left(device_id: str) -> int:
            promised = self._reserved[device_id] + sum(
                m.weight_bytes + self.config.pressure.reserve_bytes(m) for m in placed[device_id]
            )
            return memory[device_id] - promised

        need = model.weight_bytes + self.config.pressure.reserve_bytes(model)
        fitting = [d for d in memory if left(d) >= need]
        if not fitting:
            return None
        if model.preferred_device in fitting:
            return model.preferred_device
        return max(fitting, key=lambda d: (left(d), -list(memory).index(d)))


class SwapPlacement:
    name = "swap"

    def __init__(self, config: PlacementConfig):
        self.config = config

    def unplaced(self, name: str) -> bool:
        return False  # loaded on demand

    def plan(self, now: float, state: ClusterState, history: PlacementHistory) -> list[Action]:
        layout = Layout.of_state(state, self.config.pressure)
        actions: list[Action] = []
        for device_id in layout.order:
            for model in layout.models_on(device_id):
                if self._unloadable(model) and model.is_idle(now, self.config.swap_keep_alive_s):
                    layout.remove(model)
                    actions.append(Evict(model.name, device_id, f"keep-alive of {self.config.swap_keep_alive_s:g} s expired"))
        pending = [m for m in state.models if m.state is ModelState.INACTIVE and m.num_inflight > 0]
        for model in sorted(pending, key=lambda m: (-m.num_inflight, m.name)):
            actions += self._load(model, layout)
        return actions

    def on_arrival(self, now: float, model: ModelInfo, state: ClusterState, history: PlacementHistory) -> list[Action]:
        if model.state is not ModelState.INACTIVE:
            return []
        return self._load(model, Layout.of_state(state, self.config.pressure))

    def _load(self, model: ModelInfo, layout: Layout) -> list[Action]:
        """A free slot where the model fits, else unload least recently used models on the best device."""
        options = []
        for rank, device_id in enumerate(layout.order):
            victims = self._lru_victims(model, device_id, layout)
            if victims is not None:
                # No eviction beats any; else the device whose most recently used victim is least recent.
                newest_victim = max((_last_used(v) for v in victims), default=float("-inf"))
                options.append(((bool(victims), newest_victim, len(layout.models_on(device_id)), rank), device_id, victims))
        if not options:
            return []  # every device is busy: the request waits for a model to go idle
        _, device_id, victims = min(options, key=lambda option: option[0])
        for victim in victims:
            layout.remove(victim)
        layout.add(dataclasses.replace(model, device_id=device_id, state=ModelState.ACTIVATING), device_id)
        return [Evict(v.name, device_id, f"swap in {model.name}") for v in victims] + [Activate(model.name, device_id)]

    def _lru_victims(self, model: ModelInfo, device_id: str, layout: Layout) -> list[ModelInfo] | None:
        trial = layout.copy()
        victims: list[ModelInfo] = []
        candidates = sorted((m for m in trial.models_on(device_id) if self._unloadable(m)), key=_last_used)
        while len(trial.models_on(device_id)) >= self.config.max_models_per_device or not trial.fits(model, device_id):
            if not candidates:
                return None
            victim = candidates.pop(0)
            trial.remove(victim)
            victims.append(victim)
        return victims

    @staticmethod
    def _unloadable(model: ModelInfo) -> bool:
        return model.state is ModelState.ACTIVE and not model.pinned and model.num_inflight == 0


def _last_used(model: ModelInfo) -> float:
    return model.rates.last_arrival_s if model.rates.last_arrival_s is not None else float("-inf")
