"""Two CPU devices in one registry (`devices: [cpu:0, cpu:1]`): a worker process each, models placed on
both, a migration while a stream runs on the model (make before break: the stream completes), and a
model whose worker is killed served from the other device while its own restarts."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import openai
import pytest

from tests.controller.server_process import (
    default_registry,
    start_server,
    stop_server,
    wait_until,
    write_registry,
)

SMOL = "smollm2-135m-instruct"
TINY = "tiny-llama-random"
TOKEN = "two-devices-admin"


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_smollm2):
    registry = default_registry()
    registry["devices"] = ["cpu:0", "cpu:1"]
    path = write_registry(tmp_path_factory.mktemp("two-devices"), registry)
    process = start_server(path, env={"PRISM_ADMIN_TOKEN": TOKEN})
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


def admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, server.base_url + "/admin" + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                         **kwargs)


def test_a_migration_while_a_stream_runs_loses_nothing(server):
    home = server.health()["models"][SMOL]["device"]
    other = next(device for device in ("cpu:0", "cpu:1") if device != home)

    async def scenario() -> tuple[int, str, httpx.Response]:
        client = openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
        stream = await client.completions.create(model=SMOL, prompt="Once upon a time", max_tokens=64, stream=True,
                                                 extra_body={"ignore_eos": True})
        chunks, finish, moved = 0, None, None
        async for chunk in stream:
            chunks += 1
            finish = chunk.choices[0].finish_reason or finish
            if chunks == 2:  # mid-stream: move the model while this request runs on it
                moved = asyncio.create_task(asyncio.to_thread(admin, server, "POST", f"/models/{SMOL}/migrate", json={"device": other}))
        return chunks, finish, await moved

    chunks, finish, moved = asyncio.run(scenario())
    assert finish == "length" and chunks >= 64  # the stream ran to its end across the migration
    assert moved.status_code == 200, moved.text
    assert moved.json()["migrated"] and moved.json()["failed_requests"] == 0 and moved.json()["device"] == other
    assert server.health()["models"][SMOL]["device"] == other
    assert admin(server, "GET", f"/models/{SMOL}").json()["also_on"] is None  # the migration is over
    assert SMOL not in {name for name, stats in server.health()["workers"][home]["models"].items() if stats["resident"]}
    assert served(server, SMOL)
    events = admin(server, "GET", "/events").json()["events"]
    assert [e for e in events if e["kind"] == "migrated" and e["model"] == SMOL]


def test_a_migration_to_an_unknown_device_or_of_a_model_already_there_is_refused_or_a_no_op(server):
    response = admin(server, "POST", f"/models/{SMOL}/migrate", json={"device": "cpu:7"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "device"
    here = server.health()["models"][SMOL]["device"]
    assert admin(server, "POST", f"/models/{SMOL}/migrate", json={"device": here}).json()["migrated"] is False


def test_a_model_whose_worker_is_killed_is_served_from_the_other_device(server):
    home = server.health()["models"][SMOL]["device"]
    other = next(device for device in ("cpu:0", "cpu:1") if device != home)
    old = server.worker_pid(home)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: server.health()["models"][SMOL]["state"] != "active", 30, what="the controller to see its worker gone")
    assert served(server, SMOL)
    assert server.health()["models"][SMOL]["device"] == other
    def back(worker: dict) -> bool:  # one snapshot: a new process, ready
        return worker["state"] == "ready" and worker["pid"] != old

    wait_until(lambda: back(server.health()["workers"][home]), 120, what="the killed worker to be back")
    assert served(server, TINY) and served(server, SMOL)
