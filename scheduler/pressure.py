"""Device pressure (Prism's KV pressure ratio with a compute term), greedy placement, eviction cost.

KV pressure ratio of device i (Prism Algorithm 1):

    KVPR_i = sum over its models of demand_m / (memory_i - resident weights_i)
    demand_m = token_rate_m * kv_bytes_per_token_m / tpot_slo_m

It is the rate at which the models want KV memory, weighted by how little queueing their SLO allows,
per byte of memory left for KV. Lower is better; placement minimises the largest one.

Compute term. KVPR ignores compute, so it happily stacks the two busiest large models on one device
(their weights are large but their KV per token may be small), where their steps then take turns
and both miss their TPOT. We scale KVPR by a processor-sharing slowdown:

    pressure_i = KVPR_i / (1 - min(compute_weight * C_i, max_compute_share)),   C_i = sum of compute_share_m

Why this form: a sequence holds its KV for as long as it takes to finish, and under processor sharing
at utilisation C the time in system grows by 1 / (1 - C); so the KV a model really occupies grows by
the same factor. A device near saturation therefore reads as nearly full even if it has free bytes.
`compute_weight=0` gives the paper's KVPR exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from scheduler.cluster import ClusterState, DeviceInfo, ModelInfo
from scheduler.rates import ModelRates


@dataclass(frozen=True)
class PressureModel:
    min_kv_reserve_tokens: int  # a model fits only if this many of its tokens of KV fit beside the weights (registry)
    compute_weight: float = 1.0  # 0: KV pressure only (the paper); 1: full processor-sharing slowdown
    max_compute_share: float = 0.95  # caps the slowdown at 20x so overloaded devices still compare

    def reserve_bytes(self, model: ModelInfo) -> int:
        return self.min_kv_reserve_tokens * model.kv_bytes_per_token

    def pressure(self, models: Iterable[ModelInfo], memory_bytes: int) -> float:
        models = list(models)
        shared = memory_bytes - sum(m.weight_bytes for m in models)
        if shared <= 0:
            return math.inf
        kvpr = sum(m.demand for m in models) / shared
        utilisation = min(self.compute_weight * sum(m.compute_share for m in models), self.max_compute_share)
        return kvpr / (1.0 - utilisation)


def compute_share(rates: ModelRates, step_s: float, tpot_slo_s: float, prefill_tokens_per_s: float) -> float:
    """Predicted fraction of a device's time a model's steps take at `rates` (for `ModelInfo.compute_share`).

    Decode is memory-bound: a step costs about `step_s` (weights read once) whatever the batch, and the
    model needs at most one step per TPOT (batching covers the rest), but no more steps than tokens.
    Prefill is compute-bound: prompt tokens at the measured prefill speed.
    """
    steps_per_s = min(rates.decode_token_rate, 1.0 / tpot_slo_s)
    return steps_per_s * step_s + rates.prompt_token_rate / prefill_tokens_per_s


class Layout:
    """A working copy of which models sit on which device, to try decisions before emitting them."""

    def __init__(self, devices: Sequence[DeviceInfo], pressure: PressureModel):
        self.devices = {d.device_id: d for d in devices}
        self.order = [d.device_id for d in devices]  # tie-break: the listed order
        self.model = pressure
        self.by_device: dict[str, dict[str, ModelInfo]] = {d: {} for d in self.order}

    @classmethod
    def of_state(cls, state: ClusterState, pressure: PressureModel) -> Layout:
        layout = cls(state.devices, pressure)
        for model in state.models:
            if model.is_resident and model.device_id in layout.devices:
                layout.add(model, model.device_id)
            if model.also_on in layout.devices:  # a migration in flight: booked on both of its devices
                layout.add(model, model.also_on)
        return layout

    def copy(self) -> Layout:
        other = Layout(list(self.devices.values()), self.model)
        other.by_device = {d: dict(models) for d, models in self.by_device.items()}
        return other

    def add(self, model: ModelInfo, device_id: str) -> None:
        self.by_device[device_id][model.name] = model

    def remove(self, model: ModelInfo) -> None:
        for models in self.by_device.values():
            models.pop(model.name, None)

    def device_of(self, model: ModelInfo) -> str | None:
        return next((d for d, models in self.by_device.items() if model.name in models), None)

    def models_on(self, device_id: str) -> list[ModelInfo]:
        return list(self.by_device[device_id].values())

    def free_bytes(self, device_id: str) -> int:
        """Memory not taken by weights: what KV can use."""
        return self.devices[device_id].memory_bytes - sum(m.weight_bytes for m in self.by_device[device_id].values())

    def fits(self, model: ModelInfo, device_id: str) -> bool:
        return self.free_bytes(device_id) >= model.weight_bytes + self.model.reserve_bytes(model)

    def pressure(self, device_id: str, plus: ModelInfo | None = None) -> float:
        models = [m for m in self.by_device[device_id].values() if plus is None or m.name != plus.name]
        return self.model.pressure(models + ([plus] if plus else []), self.devices[device_id].memory_bytes)

    def max_pressure(self) -> float:
        return max((self.pressure(d) for d in self.order), default=0.0)

    def best_device(self, model: ModelInfo, prefer: str | None = None) -> str | None:
        """The fitting device with the lowest resulting pressure; ties: `prefer`, then most free, then order."""
        fitting = [d for d in self.order if self.fits(model, d)]
        if not fitting:
            return None
        return min(
            fitting,
            key=lambda d: (self.pressure(d, plus=model), d != prefer, -self.free_bytes(d), self.order.index(d)),
        )


def greedy_assign(
    models: Sequence[ModelInfo],
    devices: Sequence[DeviceInfo],
    pressure: PressureModel,
    fixed: Sequence[ModelInfo] = (),
) -> dict[str, str]:
    """Prism Algorithm 1: models by decreasing demand, each to the device with the lowest resulting pressure.

    `fixed` models stay on their `device_id` and are placed first (pinned, busy loading, cooling down).
    Ties prefer a model's current device, so an unchanged load gives an unchanged answer. Models that
    fit nowhere are left out of the result. O(N log N + N M K) for N models, M devices, K per device.
    """
    layout = Layout(devices, pressure)
    for model in fixed:
        layout.add(model, model.device_id)
    assignment: dict[str, str] = {}
    for model in sorted(models, key=lambda m: (-m.demand, -m.weight_bytes, m.name)):
        device_id = layout.best_device(model, prefer=model.device_id)
        if device_id is not None:
            layout.add(model, device_id)
            assignment[model.name] = device_id
    return assignment


EXACT_LIMIT = 12  # 4096 subsets: a few milliseconds at worst, once per activation that must evict


@dataclass(frozen=True)
class EvictionCost:
    """Expected cost of evicting an idle model: reload time x chance it is needed again soon."""

    load_bytes_per_s: float = 25e9  # host-to-device weight bandwidth (pinned PCIe measured 54.8 GB/s)
    horizon_s: float = 60.0  # "soon": a re-arrival within this long pays the reload in someone's TTFT

    def rearrival_probability(self, rates: ModelRates, now: float) -> float:
        """P(at least one arrival within the horizon) for Poisson arrivals at the model's rate.

        With no arrival in the rate window, the time since the last one is the best guess of the gap
        between arrivals (never-seen models get 0).
        """
        rate = rates.request_rate
        if rate <= 0:
            idle_s = rates.idle_s(now)
            rate = 0.0 if math.isinf(idle_s) else 1.0 / max(idle_s, 1e-9)
        return 1.0 - math.exp(-rate * self.horizon_s)

    def reload_s(self, model: ModelInfo) -> float:
        """Time to load its weights onto a device."""
        return model.weight_bytes / self.load_bytes_per_s

    def of(self, model: ModelInfo, now: float) -> float:
        return self.reload_s(model) * self.rearrival_probability(model.rates, now)

    def cheapest_victims(self, candidates: Sequence[ModelInfo], bytes_needed: int, now: float) -> list[ModelInfo] | None:
        """The set of candidates freeing at least `bytes_needed` at the lowest total expected cost.

        Exact (all subsets) up to `EXACT_LIMIT` candidates, which covers the handful of models one device
        holds; beyond that greedy by cost per byte, then drop whichever victims the rest already cover.
        None when all of them together cannot free enough.
        """
        if bytes_needed <= 0:
            return []
        if sum(m.weight_bytes for m in candidates) < bytes_needed:
            return None
        costs = {m.name: self.of(m, now) for m in candidates}
        if len(candidates) <= EXACT_LIMIT:
            covers = (
                list(subset)
                for size in range(1, len(candidates) + 1)
                for subset in itertools.combinations(candidates, size)
                if sum(m.weight_bytes for m in subset) >= bytes_needed
            )
            return min(covers, key=lambda vs: (sum(costs[v.name] for v in vs), len(vs), sum(v.weight_bytes for v in vs)))
        victims: list[ModelInfo] = []
        for model in sorted(candidates, key=lambda m: (costs[m.name] / max(m.weight_bytes, 1), m.name)):
            victims.append(model)
            if sum(v.weight_bytes for v in victims) >= bytes_needed:
                break
        for model in sorted(victims, key=lambda m: -costs[m.name]):
            rest = [v for v in victims if v is not model]
            if sum(v.weight_bytes for v in rest) >= bytes_needed:
                victims = rest
        return victims
