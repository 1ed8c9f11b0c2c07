"""A model outside the resident set is served even while the residents never go idle (a real server, CPU).

Two tiny models in a pool that holds one: one is kept busy by two clients without pause, then the other is
asked for. Regression for the GPU chaos run, where placement evicted only idle models: the tail of a
popularity law waited its whole request timeout behind busy residents and got 504.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import yaml

from controller.registry import default_registry_path
from tests.controller.server_process import start_server, stop_server

TOKEN = "starvation-admin"


def test_a_model_waiting_behind_busy_residents_is_activated_after_the_wait_bound(tmp_path):
    tiny = str(default_registry_path().parent / "tiny-llama.json")
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "server": {"admin_token_env": "PRISM_TEST_ADMIN_TOKEN", "request_timeout_s": 60},
        "devices": ["cpu"],
        "memory": {"cpu_budget_bytes": "28MiB"},  # one 12 MiB model (7 pages of 2 MiB) with its KV, not two
        "scheduler": {"idle_evict_s": 600, "max_activation_wait_s": 1.0, "min_kv_reserve_tokens": 256},
        "models": [{"name": name, "load_format": "dummy", "config": tiny, "seed": i, "max_model_len": 512}
                   for i, name in enumerate(("busy", "tail"))],
    }))
    server = start_server(registry, env={"PRISM_TEST_ADMIN_TOKEN": TOKEN})
    try:
        asyncio.run(scenario(server.base_url))
        events = httpx.get(server.base_url + "/admin/events", params={"limit": 1000},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()["events"]
        evictions = [e for e in events if e["kind"] == "evicted"]
        assert any(e["model"] == "busy" and "make room for tail" in e["detail"] for e in evictions), evictions
        assert not any("failed" in e["detail"] for e in evictions), "the busy model's running requests were drained, not failed"
    finally:
        stop_server(server)


async def scenario(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=90)
    first = await client.completions.create(model="busy", prompt=[5, 6, 7], max_tokens=1)
    assert first.choices[0].finish_reason == "length"
    stop, both_going = asyncio.Event(), asyncio.Event()
    busy_done: list[str] = []

    async def keep_busy() -> None:  # no pause between requests: the model never has none in flight
        while not stop.is_set():
            r = await client.completions.create(model="busy", prompt=[5, 6, 7, 8], max_tokens=48,
                                                extra_body={"min_tokens": 48, "ignore_eos": True})
            busy_done.append(r.choices[0].finish_reason)
            if len(busy_done) >= 2:
                both_going.set()

    loops = [asyncio.create_task(keep_busy()) for _ in range(2)]
    await asyncio.wait_for(both_going.wait(), 60)  # the busy model has served two of its requests and keeps sending: the tail comes now
    try:
        tail = await client.completions.create(model="tail", prompt=[9, 10, 11], max_tokens=4)
        assert tail.usage.completion_tokens == 4  # before the fix: a 504 after the 60 s request timeout
    finally:
        stop.set()
        await asyncio.gather(*loops)  # the busy model's own requests wait their turn and complete
    assert busy_done and set(busy_done) == {"length"}
