"""KV pressure ratio, the compute term, greedy placement against brute force, and eviction cost.

Bounds tested for the greedy (Prism Algorithm 1 with compute_weight = 0, i.e. the paper's KVPR). The
Prism paper states the algorithm and its complexity but, as far as we could find, no approximation
bound, so we test bounds that are proven for this greedy in special cases:

1. Identical devices, weights negligible: KVPR_i = D_i / M, so the greedy is Graham's LPT rule for
   makespan on identical machines: max KVPR <= (4/3 - 1/(3m)) x optimum (Graham 1969).
2. Devices of different memory, weights negligible: KVPR_i = D_i / M_i is makespan on uniformly related
   machines of speeds M_i, and "lowest resulting KVPR" is LPT assigning each job where it finishes
   first: max KVPR <= 2m / (m + 1) x optimum (Gonzalez, Ibarra and Sahni 1977).
3. Identical devices of memory M with weights, all weights together <= (1 - a) M, a > 0: <= (2 - 1/m) / a
   x optimum. Proof: let k be the device of largest final pressure and j the last model put on it.
   When j was placed, k minimised the resulting pressure, and every device's denominator was at least
   a M, so S_k <= (D_i + d_j) / (a M) for every i; take the least loaded i, D_i <= (sum D - d_j) / m.
   Then S_k <= (sum D / m + (1 - 1/m) d_j) / (a M), and the optimum is at least sum D / (m M) (some
   device carries the average demand over at most M bytes) and at least d_j / M. Hence the bound.
   Without the condition there is no constant bound (see the last test of the section).
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.cluster import DeviceInfo, ModelInfo
from scheduler.pressure import EvictionCost, Layout, PressureModel, compute_share, greedy_assign
from scheduler.rates import ModelRates
from tests.scheduler.factories import GB, device, model

KVPR_ONLY = PressureModel(compute_weight=0.0, min_kv_reserve_tokens=0)
WITH_COMPUTE = PressureModel(compute_weight=1.0, min_kv_reserve_tokens=0)


def max_pressure(assignment: dict[str, str], models: list[ModelInfo], devices: list[DeviceInfo], pressure: PressureModel) -> float:
    layout = Layout(devices, pressure)
    for m in models:
        layout.add(m, assignment[m.name])
    return layout.max_pressure()


def optimum(models: list[ModelInfo], devices: list[DeviceInfo], pressure: PressureModel) -> float:
    ids = [d.device_id for d in devices]
    return min(
        max_pressure(dict(zip([m.name for m in models], choice)), models, devices, pressure)
        for choice in itertools.product(ids, repeat=len(models))
    )


def test_kvpr_of_a_device_is_summed_demand_over_memory_left_by_weights():
    models = [model("a", demand=30, weight_gb=20), model("b", demand=10, weight_gb=20)]
    assert KVPR_ONLY.pressure(models, 80 * GB) == pytest.approx(40 / (40 * GB))
    assert KVPR_ONLY.pressure(models, 40 * GB) == math.inf  # no memory left for KV
    # The compute term scales it by the processor-sharing slowdown 1 / (1 - utilisation).
    busy = [model("a", demand=30, weight_gb=20, compute_share=0.3), model("b", demand=10, weight_gb=20, compute_share=0.2)]
    assert WITH_COMPUTE.pressure(busy, 80 * GB) == pytest.approx(40 / (40 * GB) / 0.5)


def test_compute_share_counts_one_decode_step_per_tpot_at_most_plus_prefill_time():
    busy = ModelRates(prompt_token_rate=2000.0, decode_token_rate=500.0)
    assert compute_share(busy, step_s=0.01, tpot_slo_s=0.05, prefill_tokens_per_s=10_000.0) == pytest.approx(20 * 0.01 + 0.2)
    light = ModelRates(decode_token_rate=5.0)  # fewer tokens than TPOT slots: one step per token
    assert compute_share(light, step_s=0.01, tpot_slo_s=0.05, prefill_tokens_per_s=10_000.0) == pytest.approx(0.05)


def test_greedy_hand_worked_example_places_the_biggest_demand_first():
    devices = [device("g0", 100), device("g1", 100)]
    models = [model("a", demand=5), model("b", demand=4), model("c", demand=3), model("d", demand=3), model("e", demand=3)]
    # LPT: a->g0 (5), b->g1 (4), c->g1 (7), d->g0 (8), e->g1 (10). Optimum: {a, b} 9 / {c, d, e} 9.
    assignment = greedy_assign(models, devices, KVPR_ONLY)
    assert assignment == {"a": "g0", "b": "g1", "c": "g1", "d": "g0", "e": "g1"}
    assert max_pressure(assignment, models, devices, KVPR_ONLY) / optimum(models, devices, KVPR_ONLY) == pytest.approx(10 / 9)


def test_compute_term_separates_two_hot_large_models_that_kvpr_alone_stacks():
    devices = [device("g0", 100), device("g1", 100)]
    kv_hungry_small = model("small", demand=10, weight_gb=2, compute_share=0.1)
    hot_large = [model(name, demand=1, weight_gb=40, compute_share=0.6) for name in ("large-a", "large-b")]
    models = [kv_hungry_small, *hot_large]

    kvpr_only = greedy_assign(models, devices, KVPR_ONLY)
    with_compute = greedy_assign(models, devices, WITH_COMPUTE)

    assert kvpr_only["large-a"] == kvpr_only["large-b"]  # 2 / 20 GB beats 11 / 58 GB: stacked at 120 % compute
    assert with_compute["large-a"] != with_compute["large-b"]
    utilisation = {
        name: max(sum(m.compute_share for m in models if a[m.name] == d) for d in ("g0", "g1"))
        for name, a in (("kvpr_only", kvpr_only), ("with_compute", with_compute))
    }
    assert utilisation == {"kvpr_only": pytest.approx(1.2), "with_compute": pytest.approx(0.7)}
    # The gain, in the compute-aware measure: the stacked placement is far more pressured.
    assert max_pressure(kvpr_only, models, devices, WITH_COMPUTE) > 3 * max_pressure(with_compute, models, devices, WITH_COMPUTE)


def test_models_that_fit_nowhere_are_left_out_and_the_reserve_counts():
    devices = [device("g0", 20)]
    reserve = PressureModel(min_kv_reserve_tokens=2 * GB)  # 2 GB of KV at 1 byte per token
    assert greedy_assign([model("big", weight_gb=19)], devices, reserve) == {}
    assert greedy_assign([model("ok", weight_gb=18)], devices, reserve) == {"ok": "g0"}


demands = st.lists(st.integers(1, 100), min_size=1, max_size=7)


@settings(max_examples=150, deadline=None)
@given(demand_list=demands, num_devices=st.integers(2, 3))
def test_identical_devices_without_weights_stay_within_grahams_lpt_bound(demand_list, num_devices):
    devices = [device(f"g{i}", 100) for i in range(num_devices)]
    models = [model(f"m{i}", demand=d) for i, d in enumerate(demand_list)]
    greedy = max_pressure(greedy_assign(models, devices, KVPR_ONLY), models, devices, KVPR_ONLY)
    bound = 4 / 3 - 1 / (3 * num_devices)
    assert greedy <= bound * optimum(models, devices, KVPR_ONLY) * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(demand_list=demands, memories=st.lists(st.integers(10, 100), min_size=2, max_size=3))
def test_devices_of_different_memory_without_weights_stay_within_the_uniform_machines_lpt_bound(demand_list, memories):
    devices = [device(f"g{i}", m) for i, m in enumerate(memories)]
    models = [model(f"m{i}", demand=d) for i, d in enumerate(demand_list)]
    greedy = max_pressure(greedy_assign(models, devices, KVPR_ONLY), models, devices, KVPR_ONLY)
    num_devices = len(devices)
    assert greedy <= 2 * num_devices / (num_devices + 1) * optimum(models, devices, KVPR_ONLY) * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(1, 100), st.integers(0, 12)), min_size=1, max_size=6),
    num_devices=st.integers(2, 3),
)
def test_identical_devices_with_weights_stay_within_the_proven_bound(items, num_devices):
    devices = [device(f"g{i}", 100) for i in range(num_devices)]
    models = [model(f"m{i}", demand=d, weight_gb=w) for i, (d, w) in enumerate(items)]
    alpha = 1 - sum(w for _, w in items) / 100  # at least 0.28 with six models of at most 12 GB
    greedy = max_pressure(greedy_assign(models, devices, KVPR_ONLY), models, devices, KVPR_ONLY)
    assert greedy <= (2 - 1 / num_devices) / alpha * optimum(models, devices, KVPR_ONLY) * (1 + 1e-9)


def test_without_the_weight_condition_greedy_kvpr_has_no_constant_bound():
    """Known limit, pinned so that a better algorithm shows up here: a low-demand model with large
    weights is placed last and squeezes whichever device it joins, while the optimum stacks the two
    demanding models and leaves the heavy one alone."""
    devices = [device("g0", 10), device("g1", 10)]
    models = [model("a", demand=10), model("b", demand=10), model("heavy", demand=0.001, weight_gb=9.9)]
    greedy = max_pressure(greedy_assign(models, devices, KVPR_ONLY), models, devices, KVPR_ONLY)
    assert greedy / optimum(models, devices, KVPR_ONLY) > 20


def test_eviction_cost_is_reload_time_times_chance_of_a_near_rearrival():
    cost = EvictionCost(load_bytes_per_s=10 * GB, horizon_s=60.0)
    steady = model("steady", weight_gb=20, request_rate=0.05, last_arrival_s=0.0)
    assert cost.of(steady, now=50.0) == pytest.approx(2.0 * (1 - math.exp(-3.0)))
    quiet = model("quiet", weight_gb=20, last_arrival_s=0.0)  # nothing in the window: the gap since the last one
    assert cost.of(quiet, now=120.0) == pytest.approx(2.0 * (1 - math.exp(-0.5)))
    assert cost.of(model("never", weight_gb=20), now=120.0) == 0.0


def test_cheapest_victims_free_enough_bytes_at_the_lowest_expected_cost():
    cost = EvictionCost(load_bytes_per_s=10 * GB, horizon_s=60.0)
    now = 1000.0
    hot_small = model("hot-small", weight_gb=10, request_rate=1.0, last_arrival_s=now - 50)
    cold_big = model("cold-big", weight_gb=30, last_arrival_s=now - 3000)
    cold_small = model("cold-small", weight_gb=8, last_arrival_s=now - 3000)
    candidates = [hot_small, cold_big, cold_small]
    assert cost.cheapest_victims(candidates, 5 * GB, now) == [cold_small]
    assert cost.cheapest_victims(candidates, 20 * GB, now) == [cold_big]  # cold_small is redundant, dropped
    assert cost.cheapest_victims(candidates, 0, now) == []
    assert cost.cheapest_victims(candidates, 49 * GB, now) is None


def test_many_candidates_fall_back_to_greedy_and_still_cover_the_need_without_redundancy():
    cost = EvictionCost(load_bytes_per_s=10 * GB, horizon_s=60.0)
    candidates = [model(f"c{i:02d}", weight_gb=1 + i % 3, last_arrival_s=0.0) for i in range(14)]
    victims = cost.cheapest_victims(candidates, 5 * GB, now=100.0)
    freed = sum(v.weight_bytes for v in victims)
    assert freed >= 5 * GB
    assert all(freed - v.weight_bytes < 5 * GB for v in victims)  # none of them is redundant
