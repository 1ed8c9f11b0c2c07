"""The static and swap baselines behave like the systems they stand for."""

from __future__ import annotations

import dataclasses

from scheduler.cluster import Activate, Evict, ModelState
from scheduler.placement import GlobalScheduler
from scheduler.pressure import PressureModel
from tests.scheduler.factories import GB, cluster, device, model, placement_config

NO_RESERVE = PressureModel(min_kv_reserve_tokens=0)


def static() -> GlobalScheduler:
    return GlobalScheduler("static", placement_config(pressure=NO_RESERVE))


def swap(**overrides) -> GlobalScheduler:
    return GlobalScheduler("swap", placement_config(pressure=NO_RESERVE, **overrides))


def test_static_activates_everything_once_with_fixed_kv_shares_and_honours_preferred_devices():
    state = cluster(
        [device("g0", 80), device("g1", 80)],
        [model("a", weight_gb=30), model("b", weight_gb=20), model("c", weight_gb=10, preferred_device="g0"),
         model("huge", weight_gb=90)],
    )
    actions = static().plan(0.0, state)
    # Larger first, each to the device with most memory left (c where the registry asked): g0 = a + c, g1 = b.
    assert actions == [
        Activate("a", "g0", kv_budget_bytes=20 * GB),  # (80 - 30 - 10) / 2
        Activate("b", "g1", kv_budget_bytes=60 * GB),
        Activate("c", "g0", kv_budget_bytes=20 * GB),
    ]
    policy = static()
    assert policy.on_arrival(0.0, "huge", state) == []  # fits nowhere: never placed
    assert policy.unplaced("huge") and not policy.unplaced("a")
    assert not static().unplaced("huge"), "before the assignment has seen a model, nothing is known of it"


def test_static_never_evicts_or_migrates_whatever_the_load():
    policy = static()
    state = cluster([device("g0", 80), device("g1", 80)], [model("a", 100, weight_gb=10), model("b", 100, weight_gb=10)])
    activations = policy.plan(0.0, state)
    placed = {a.model: a.device for a in activations}
    crowded = cluster(
        [device("g0", 80), device("g1", 80)],
        [model("a", 1000, weight_gb=10, on=placed["a"], compute_share=0.9, num_inflight=5),
         model("b", 1000, weight_gb=10, on=placed["b"], compute_share=0.9, num_inflight=5),
         model("idle", weight_gb=10, on=placed["a"], last_arrival_s=0.0)],
    )
    assert policy.plan(10_000.0, crowded) == []


def test_swap_loads_on_demand_into_a_free_slot():
    state = cluster([device("g0", 80), device("g1", 80)], [model("a", weight_gb=10, on="g0", num_inflight=1), model("b", weight_gb=10)])
    assert swap().on_arrival(0.0, "b", state) == [Activate("b", "g1")]


def test_swap_unloads_the_least_recently_used_idle_model_when_slots_are_full():
    state = cluster(
        [device("g0", 80), device("g1", 80)],
        [model("older", weight_gb=10, on="g0", last_arrival_s=100.0),
         model("newer", weight_gb=10, on="g1", last_arrival_s=200.0),
         model("c", weight_gb=10)],
    )
    assert swap().on_arrival(300.0, "c", state) == [Evict("older", "g0", "swap in c"), Activate("c", "g0")]


def test_swap_waits_while_every_slot_is_busy_and_respects_memory_with_more_slots():
    busy = cluster([device("g0", 80)], [model("a", weight_gb=10, on="g0", num_inflight=1), model("b", weight_gb=10)])
    assert swap().on_arrival(0.0, "b", busy) == []
    roomy = cluster([device("g0", 80)], [model("a", weight_gb=50, on="g0", last_arrival_s=0.0), model("b", weight_gb=40)])
    assert swap(max_models_per_device=3).on_arrival(10.0, "b", roomy) == [Evict("a", "g0", "swap in b"), Activate("b", "g0")]


def test_swap_unloads_models_past_keep_alive_and_loads_waiting_ones():
    state = cluster(
        [device("g0", 80)],
        [model("stale", weight_gb=10, on="g0", last_arrival_s=0.0), model("fresh", weight_gb=10, num_inflight=1)],
    )
    policy = swap(max_models_per_device=2, swap_keep_alive_s=300.0)
    assert policy.plan(100.0, state) == [Activate("fresh", "g0")]
    assert policy.plan(400.0, state) == [Evict("stale", "g0", "keep-alive of 300 s expired"), Activate("fresh", "g0")]
    loaded = cluster([device("g0", 80)], [dataclasses.replace(m, device_id="g0", state=ModelState.ACTIVE) for m in state.models])
    assert [a.model for a in policy.plan(400.0, loaded)] == ["stale"]
