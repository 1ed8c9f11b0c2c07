"""Builders of global-scheduler inputs: devices and models in round numbers, so pressures are hand-checkable."""

from __future__ import annotations

import dataclasses

from controller.registry import SchedulerConfig
from scheduler.cluster import ClusterState, DeviceInfo, ModelInfo, ModelState
from scheduler.placement_config import PlacementConfig
from scheduler.pressure import EvictionCost
from scheduler.rates import ModelRates

GB = 10**9


def device(device_id: str, memory_gb: float = 80.0, peer_access: bool = False) -> DeviceInfo:
    return DeviceInfo(device_id, int(memory_gb * GB), peer_access)


def model(
    name: str,
    demand: float = 0.0,
    weight_gb: float = 0.0,
    *,
    on: str | None = None,
    state: ModelState | None = None,
    compute_share: float = 0.0,
    pinned: bool = False,
    num_inflight: int = 0,
    request_rate: float = 0.0,
    last_arrival_s: float | None = None,
    kv_gb_in_use: float = 0.0,
    preferred_device: str | None = None,
    activated_s: float | None = None,
    waiting_s: float = 0.0,
) -> ModelInfo:
    """A model whose `demand` is exactly the given number: 1 KV byte per token, TPOT SLO 1 s."""
    return ModelInfo(
        name=name,
        weight_bytes=int(weight_gb * GB),
        kv_bytes_per_token=1,
        tpot_slo_s=1.0,
        ttft_slo_s=1.0,
        pinned=pinned,
        device_id=on,
        state=state or (ModelState.ACTIVE if on else ModelState.INACTIVE),
        rates=ModelRates(request_rate=request_rate, prompt_token_rate=demand, last_arrival_s=last_arrival_s),
        compute_share=compute_share,
        num_inflight=num_inflight,
        kv_bytes_in_use=int(kv_gb_in_use * GB),
        preferred_device=preferred_device,
        activated_s=activated_s,
        waiting_s=waiting_s,
    )


def cluster(devices: list[DeviceInfo], models: list[ModelInfo]) -> ClusterState:
    return ClusterState(tuple(devices), tuple(models))


def placement_config(**overrides) -> PlacementConfig:
    """The registry's default placement settings (as the controller builds them), with `overrides`."""
    return dataclasses.replace(SchedulerConfig().placement(EvictionCost().load_bytes_per_s), **overrides)
