"""Two CPU devices in one registry (`devices: [cpu:0, cpu:1]`): a worker process each, models placed on
both, and a model whose worker is killed served from the other device while its own restarts."""

from __future__ import annotations

import os
import signal

import openai
import pytest
import yaml

from controller.registry import default_registry_path
from tests.controller.server_process import start_server, stop_server, wait_until

SMOL = "smollm2-135m-instruct"
TINY = "tiny-llama-random"


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_smollm2):
    registry = yaml.safe_load(default_registry_path().read_text())
    registry["models"][1]["config"] = str(default_registry_path().parent / registry["models"][1]["config"])
    registry["devices"] = ["cpu:0", "cpu:1"]
    path = tmp_path_factory.mktemp("two-devices") / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    process = start_server(path)
    yield process
    stop_server(process)


def served(server, model: str) -> bool:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model=model, prompt="Hello", max_tokens=3).usage.completion_tokens == 3


def test_each_device_runs_its_own_worker_and_the_models_land_on_both(server):
    health = server.health()
    assert set(health["workers"]) == {"cpu:0", "cpu:1"}
    assert len({worker["pid"] for worker in health["workers"].values()}) == 2
    assert {model["device"] for model in health["models"].values()} == {"cpu:0", "cpu:1"}
    assert served(server, SMOL) and served(server, TINY)


def test_a_model_whose_worker_is_killed_is_served_from_the_other_device(server):
    home = server.health()["models"][SMOL]["device"]
    other = next(device for device in ("cpu:0", "cpu:1") if device != home)
    old = server.worker_pid(home)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: server.health()["models"][SMOL]["state"] != "active", 30, what="the controller to see its worker gone")
    assert served(server, SMOL)
    assert server.health()["models"][SMOL]["device"] == other
    wait_until(lambda: server.health()["workers"][home]["state"] == "ready" and server.worker_pid(home) != old, 120,
               what="the killed worker to be back")
    assert served(server, TINY) and served(server, SMOL)
