"""Activations per caller: a token bucket (fake clock), and the server refusing one key's cold loads while its
requests for active models, and another key's, go on (real server, official openai client)."""

from __future__ import annotations

import httpx
import openai
import pytest

from controller.caller_budget import ActivationBudget, caller_of
from controller.registry import default_registry_path
from tests.controller.server_process import start_server, stop_server, wait_until, write_registry


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_caller_gets_its_burst_then_one_activation_per_interval():
    clock = Clock()
    budget = ActivationBudget(per_minute=6, burst=2, clock=clock)  # one every 10 s
    assert budget.charge("a") is None and budget.charge("a") is None
    assert budget.charge("a") == pytest.approx(10.0)
    assert budget.charge("b") is None, "callers have buckets of their own"
    clock.now += 4
    assert budget.charge("a") == pytest.approx(6.0)
    clock.now += 6
    assert budget.charge("a") is None and budget.charge("a") == pytest.approx(10.0)
    clock.now += 1000
    assert budget.charge("a") is None and budget.charge("a") is None and budget.charge("a") is not None, "refills to the burst only"


def test_a_caller_is_known_by_its_key_digest_or_its_address():
    assert caller_of("sk-secret", "10.0.0.1") == caller_of("sk-secret", "10.0.0.2")
    assert "sk-secret" not in caller_of("sk-secret", None)
    assert caller_of(None, "10.0.0.1") != caller_of(None, "10.0.0.2")


KEYS = ("tenant-a-key", "tenant-b-key")
ADMIN = "budget-admin"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = str(default_registry_path().parent / "tiny-llama.json")
    registry = {
        "server": {"api_keys_env": "PRISM_TEST_KEYS", "admin_token_env": "PRISM_TEST_ADMIN",
                   "caller_activations": {"per_minute": 1, "burst": 1}},
        "devices": ["cpu"],
        "memory": {"cpu_budget_bytes": "512MiB"},
        "scheduler": {"idle_evict_s": 3600},
        "models": [{"name": name, "load_format": "dummy", "config": config, "seed": seed} for seed, name in enumerate(("cold-a", "cold-b"))],
    }
    process = start_server(write_registry(tmp_path_factory.mktemp("budget"), registry),
                           env={"PRISM_TEST_KEYS": ",".join(KEYS), "PRISM_TEST_ADMIN": ADMIN})
    yield process
    stop_server(process)


def test_one_callers_cold_loads_are_limited_and_nobody_elses(server):
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def state(name: str) -> str:
        return httpx.get(f"{server.base_url}/admin/models/{name}", headers=admin).json()["state"]

    for name in ("cold-a", "cold-b"):  # admin evictions and activations are not charged
        httpx.post(f"{server.base_url}/admin/models/{name}/evict", headers=admin, json={"drain_timeout_s": 0}).raise_for_status()
        wait_until(lambda: state(name) == "inactive", 60, what=f"{name} evicted")
    a, b = (openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0) for key in KEYS)
    assert a.completions.create(model="cold-a", prompt="Hello", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.RateLimitError) as refused:
        a.completions.create(model="cold-b", prompt="Hello", max_tokens=2)
    error = refused.value.body
    assert error["code"] == "activation_budget_exceeded" and "cold-b" in error["message"]
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert state("cold-b") == "inactive", "the refused request caused no activation"
    assert a.completions.create(model="cold-a", prompt="Hello", max_tokens=2).usage.completion_tokens == 2  # active: free
    assert b.completions.create(model="cold-b", prompt="Hello", max_tokens=2).usage.completion_tokens == 2  # its own budget
