"""The global scheduler: which model lives on which device (activation, eviction, migration).

It runs in the controller, periodically (`plan`) and when a request arrives for a model that is not
resident (`on_arrival`). It reads a `ClusterState` snapshot and returns actions; the controller carries
them out. Policies, selectable by name:

- `prism` (default), DESIGN.md section 5:
  * Activation: a non-resident model with requests goes to its preferred device if that fits without
    evicting, else to the device that fits its weights plus a minimum KV reserve with the lowest
    resulting pressure (`pressure.py`: KV pressure ratio with a compute term). If no device fits,
    idle models are evicted on the device where that is cheapest in expected cost (reload time x
    chance of re-arrival within a horizon): never pinned models; models idle for `idle_evict_s`
    first. If that is not possible the requests wait and the next cycle retries (at the latest when a
    model turns idle). Unless a model turns idle
    for `idle_evict_s` while the waiting request can still meet its TTFT SLO after the reload, models
    idle for at least their own reload time may go too: waiting longer only makes the request late (with
    reloads of tenths of a second, the paper's 40 s threshold leaves every swap-in to miss). A model whose oldest
    request has waited `max_activation_wait_s` comes first and may also evict busy models active at
    least that long (drained first; cheapest expected cost again): without it, a registry larger than
    the GPU starves every model outside the resident set while the residents stay busy (the GPU chaos
    run: 362 requests for tail models waited 120 s and got 504).
  * Eviction when memory is needed: activation (above), or a device whose KV in use passes the
    high watermark of its non-weight memory loses its cheapest idle model (one per device per cycle).
    Past `max_idle_s` (off by default) idle models are evicted even without need.
  * Migration (Prism Algorithm 1, one move at a time, and none while one is in flight: a migrating model
    counts on its source until it is gone and on its destination from the start, so the next cycle
    does not send a second hot model after it; a migrating model is never evicted): rate every single move of a model that may move
    (active, not pinned, not cooling down) by how much it lowers the larger pressure of its two
    devices, less its cost: the share of the eviction horizon (`EvictionCost.horizon_s`) that copying
    its weights takes at the load bandwidth, while it is booked on both devices; take the best, only
    if that net gain beats the hysteresis `migration_gain`; at most one per cycle, then the model cools
    down for `migration_cooldown_s`. The greedy placement (recomputed around the
    models that may not move) breaks ties: among equal gains, a move toward it wins.
    Why not simply move toward the greedy placement, as the paper does: with one move per cycle, its
    target can be a permutation of the current placement that no single move improves (it stalls).
    Why the pair and not the cluster's maximum: with two equally hot devices no single move lowers
    the maximum, yet each is a step toward balance. A move that lowers the larger of its pair's
    pressures never raises the cluster's maximum, and strictly lowers the sorted vector of pressures,
    so under steady rates moves cannot cycle; hysteresis and cooldown keep noise from making them.
- `static` and `swap`: the baselines in `baselines.py`.
"""

from __future__ import annotations

import dataclasses
import math

from scheduler.baselines import StaticPlacement, SwapPlacement
from scheduler.cluster import Action, Activate, ClusterState, Evict, Migrate, ModelInfo, ModelState
from scheduler.placement_config import PlacementConfig, PlacementHistory, PlacementPolicy
from scheduler.pressure import Layout, greedy_assign

__all__ = ["GlobalScheduler", "PlacementConfig", "PrismPlacement", "make_placement_policy", "relative_gain"]


def relative_gain(before: float, after: float) -> float:
    """Fraction by which the largest pressure drops; leaving an over-committed (infinite) state counts fully."""
    if math.isinf(before):
        return 1.0 if math.isfinite(after) else 0.0
    if before <= 0:
        return 0.0
    return (before - after) / before


class PrismPlacement:
    name = "prism"

    def __init__(self, config: PlacementConfig):
        self.config = config

    def on_arrival(self, now: float, model: ModelInfo, state: ClusterState, history: PlacementHistory) -> list[Action]:
        if model.state is not ModelState.INACTIVE:
            return []
        return self._activate(now, model, Layout.of_state(state, self.config.pressure))

    def unplaced(self, name: str) -> bool:
        return False  # any model that fits a device alone is placed, evicting others if it must

    def plan(self, now: float, state: ClusterState, history: PlacementHistory) -> list[Action]:
        layout = Layout.of_state(state, self.config.pressure)
        actions: list[Action] = []
        pending = [m for m in state.models if m.state is ModelState.INACTIVE and m.num_inflight > 0]
        for model in sorted(pending, key=lambda m: (not self._starving(m), -m.num_inflight, m.name)):
            actions += self._activate(now, model, layout)
        actions += self._relieve_memory(now, layout)
        actions += self._migrate(now, layout, history)
        return actions

    # --- activation -------------------------------------------------------------------------------

    def _activate(self, now: float, model: ModelInfo, layout: Layout) -> list[Action]:
        """Place `model` (applied to `layout`), evicting the cheapest idle models if it fits nowhere."""
        options = []
        for rank, device_id in enumerate(layout.order):
            victims = self._victims_to_fit(now, model, device_id, layout)
            if victims is None:
                continue
            trial = layout.copy()
            for victim in victims:
                trial.remove(victim)
            cost = sum(self.config.eviction.of(v, now) for v in victims)
            pressure = trial.pressure(device_id, plus=model)
            key = (cost, device_id != model.preferred_device, pressure, -trial.free_bytes(device_id), rank)
            options.append((key, device_id, victims))
        if not options:
            return []  # requests wait; the next cycle retries
        _, device_id, victims = min(options, key=lambda option: option[0])
        actions: list[Action] = []
        for victim in victims:
            layout.remove(victim)
            actions.append(Evict(victim.name, device_id, f"make room for {model.name}"))
        layout.add(dataclasses.replace(model, device_id=device_id, state=ModelState.ACTIVATING), device_id)
        return actions + [Activate(model.name, device_id)]

    def _victims_to_fit(self, now: float, model: ModelInfo, device_id: str, layout: Layout) -> list[ModelInfo] | None:
        if layout.fits(model, device_id):
            return []
        needed = model.weight_bytes + self.config.pressure.reserve_bytes(model) - layout.free_bytes(device_id)
        victims = self.config.eviction.cheapest_victims(self._evictable(now, layout, device_id), needed, now)
        if victims is None and not self._worth_waiting(now, model, layout, device_id):
            victims = self.config.eviction.cheapest_victims(self._evictable(now, layout, device_id, short_idle=True), needed, now)
        if victims is None and self._starving(model):
            victims = self.config.eviction.cheapest_victims(self._evictable(now, layout, device_id, busy_too=True), needed, now)
        return victims

    def _worth_waiting(self, now: float, model: ModelInfo, layout: Layout, device_id: str) -> bool:
        """Whether a model on the device turns idle for `idle_evict_s` (a cheaper victim: it is less likely to
        be needed again soon) while `model`'s oldest request can still meet its TTFT SLO after the reload.
        If none does, waiting only makes the request late: models idle at least their own reload time go."""
        slack = model.ttft_slo_s - self.config.eviction.reload_s(model) - model.waiting_s
        return slack > 0 and any(
            m.state is ModelState.ACTIVE and not m.pinned and m.also_on is None and m.num_inflight == 0
            and self.config.idle_evict_s - m.idle_for(now) <= slack
            for m in layout.models_on(device_id))

    def _starving(self, model: ModelInfo) -> bool:
        """Its oldest request has waited `max_activation_wait_s` for it: busy models may make room."""
        bound = self.config.max_activation_wait_s
        return bound is not None and model.waiting_s >= bound

    def _evictable(self, now: float, layout: Layout, device_id: str, busy_too: bool = False,
                   short_idle: bool = False) -> list[ModelInfo]:
        """Models idle for `idle_evict_s`; with `short_idle`, idle for as long as their own reload takes (less
        is likely a pause within a burst); with `busy_too`, also busy ones that have been active at least
        `max_activation_wait_s` (each model keeps the device that long: models waiting in turn take it in
        turn, never thrashing)."""
        def takeable(m: ModelInfo) -> bool:
            if busy_too:
                return m.activated_s is not None and now - m.activated_s >= self.config.max_activation_wait_s
            return m.is_idle(now, self.config.eviction.reload_s(m) if short_idle else self.config.idle_evict_s)

        return [m for m in layout.models_on(device_id)
                if m.state is ModelState.ACTIVE and not m.pinned and m.also_on is None and takeable(m)]

    # --- eviction when memory is needed -----------------------------------------------------------

    def _relieve_memory(self, now: float, layout: Layout) -> list[Action]:
        actions: list[Action] = []
        for device_id in layout.order:
            kv_in_use = sum(m.kv_bytes_in_use for m in layout.models_on(device_id))
            if kv_in_use < self.config.kv_high_watermark * max(layout.free_bytes(device_id), 0):
                continue
            candidates = self._evictable(now, layout, device_id)
            if candidates:
                victim = min(candidates, key=lambda m: (self.config.eviction.of(m, now), m.name))
                layout.remove(victim)
                actions.append(Evict(victim.name, device_id, "kv memory pressure"))
        if self.config.max_idle_s is not None:
            for device_id in layout.order:
                for model in layout.models_on(device_id):
                    if model.state is ModelState.ACTIVE and not model.pinned and model.also_on is None and model.is_idle(now, self.config.max_idle_s):
                        layout.remove(model)
                        actions.append(Evict(model.name, device_id, f"idle for more than {self.config.max_idle_s:g} s"))
        return actions

    # --- migration --------------------------------------------------------------------------------

    def _migrate(self, now: float, layout: Layout, history: PlacementHistory) -> list[Action]:
        resident = [m for d in layout.order for m in layout.models_on(d)]
        if any(m.also_on is not None for m in resident):
            return []  # one migration in flight at a time: decided again on the state it leaves
        cooldown_s = self.config.migration_cooldown_s
        movable = [
            m
            for m in resident
            if m.state is ModelState.ACTIVE and not m.pinned and not history.cooling_down(m.name, now, cooldown_s)
        ]
        if not movable:
            return []
        movable_names = {m.name for m in movable}
        fixed = [m for m in resident if m.name not in movable_names]
        target = greedy_assign(movable, list(layout.devices.values()), self.config.pressure, fixed)
        best_key, best_move = (0.0, False), None
        for model in movable:
            src = layout.device_of(model)
            for dst in layout.order:
                if dst == src:
                    continue
                trial = layout.copy()
                trial.remove(model)
                if not trial.fits(model, dst):
                    continue
                trial.add(model, dst)
                before = max(layout.pressure(src), layout.pressure(dst))
                gain = relative_gain(before, max(trial.pressure(src), trial.pressure(dst))) - self._migration_cost(model)
                key = (gain, target.get(model.name) == dst)
                if key > best_key:
                    best_key, best_move = key, (model, src, dst)
        best_gain = best_key[0]
        if best_move is None or best_gain <= self.config.migration_gain:
            return []
        model, src, dst = best_move
        layout.remove(model)
        layout.add(model, dst)
        return [Migrate(model.name, src, dst)]


    def _migration_cost(self, model: ModelInfo) -> float:
        """The share of the horizon a move of `model` spends copying its weights (booked on two devices)."""
        eviction = self.config.eviction
        return model.weight_bytes / eviction.load_bytes_per_s / eviction.horizon_s


POLICIES = ("prism", "static", "swap")


def make_placement_policy(name: str, config: PlacementConfig) -> PlacementPolicy:
    policies = {"prism": PrismPlacement, "static": StaticPlacement, "swap": SwapPlacement}
    if name not in policies:
        raise ValueError(f"unknown placement policy {name!r}; expected one of {POLICIES}")
    return policies[name](config)


class GlobalScheduler:
    """Placement decisions as data: `plan(now, state)` each cycle, `on_arrival(now, model, state)` on demand.

    It keeps the only state that must survive between cycles (when each model last moved) and checks
    the policy's actions against the invariants every policy shares. Contract with the controller:
    the next `state` shows the actions it started (an activated model as ACTIVATING on its device, an
    evicted one as EVICTING); an action whose effect the state does not show yet is decided again.
    """

    def __init__(self, policy: str | PlacementPolicy, config: PlacementConfig):
        self.config = config
        self.policy = make_placement_policy(policy, self.config) if isinstance(policy, str) else policy
        self.history = PlacementHistory()

    def plan(self, now: float, state: ClusterState) -> list[Action]:
        return self._commit(now, state, self.policy.plan(now, state, self.history))

    def unplaced(self, model: str) -> bool:
        """Whether the policy will never place `model` (static partitioning's models that fit nowhere)."""
        return self.policy.unplaced(model)

    def on_arrival(self, now: float, model: str, state: ClusterState, *, dry_run: bool = False) -> list[Action]:
        """Actions for a request to `model` (empty if it is resident or must wait). `dry_run`: remember nothing."""
        actions = self.policy.on_arrival(now, state.model(model), state, self.history)
        return actions if dry_run else self._commit(now, state, actions)

    def _commit(self, now: float, state: ClusterState, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Evict):
                victim = state.model(action.model)
                assert not victim.pinned, f"policy evicted a pinned model: {action}"
                bound = self.config.max_activation_wait_s
                assert victim.num_inflight == 0 or (bound is not None and any(
                    isinstance(a, Activate) and state.model(a.model).waiting_s >= bound for a in actions)), \
                    f"policy evicted a busy model for no model starving past the wait bound: {action}"
            if isinstance(action, Migrate):
                assert not state.model(action.model).pinned, f"policy migrated a pinned model: {action}"
            if isinstance(action, (Activate, Migrate)):
                self.history.last_moved_s[action.model] = now
        assert sum(isinstance(a, Migrate) for a in actions) <= 1, "more than one migration in a cycle"
        return actions
