"""The trace replay benchmark: trace formats, model mapping, attainment, and a CI-sized run on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.replay import (
    Result, TraceRequest, assign_models, gc_stats, gc_summary, load_trace, policy_registry, step_summary, summarize, wilson_interval,
)
from controller.metrics import Metrics
from workers.contract.messages import GC_PAUSE_BUCKETS_S, GcStats

ROOT = Path(__file__).resolve().parents[2]


def write_arena(path: Path) -> Path:
    rows = ["req_time_s,adapter_rank,adapter_dir,prompt_len,output_len"]
    rows += [f"{0.5 * i:.3f},{i % 3},dummy,{8 + i},{4 + i % 3}" for i in range(12)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_arena_trace_streams_map_to_models(tmp_path):
    trace = load_trace(write_arena(tmp_path / "arena.csv"))
    assert len(trace) == 12 and trace[1] == TraceRequest(0.5, 1, 9, 5)
    jobs = assign_models(trace, ["a", "b"], [0, 2], alpha=1.0, seed=0)
    assert {m for _, m in jobs} == {"a", "b"} and len(jobs) == 8  # stream 1 is not replayed
    assert all((r.stream == 0) == (m == "a") for r, m in jobs)


def test_azure_trace_gets_a_popularity_law(tmp_path):
    path = tmp_path / "azure.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [f"2023-11-16 18:15:{i:02d}.5000000,{100 + i},{10 + i}" for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    trace = load_trace(path)
    assert trace[0].time_s == 0 and trace[-1].time_s == pytest.approx(59.0)
    jobs = assign_models(trace, ["hot", "warm", "cold"], None, alpha=2.0, seed=1)
    counts = {m: sum(1 for _, x in jobs if x == m) for m in ("hot", "warm", "cold")}
    assert counts["hot"] > counts["warm"] > 0 and counts["hot"] > counts["cold"]


def test_summary_counts_attainment_per_model_and_overall():
    slos = {"a": {"ttft_p95_s": 0.1, "tpot_p95_s": 0.01}, "b": {"ttft_p95_s": 1.0, "tpot_p95_s": 0.1}}
    results = [
        Result("a", 0, ttft_s=0.2, tpot_s=0.01, num_tokens=5),  # met (scale 5 -> 0.5 s)
        Result("a", 0, ttft_s=0.9, tpot_s=0.01, num_tokens=5),  # TTFT missed
        Result("b", 0, ttft_s=0.5, tpot_s=0.9, num_tokens=5),  # TPOT missed
        Result("b", 0, error="HTTP 503"),  # an error misses both
    ]
    summary = summarize(results, slos, slo_scale=5.0, wall_s=2.0)
    a, b = summary["per_model"]["a"], summary["per_model"]["b"]
    assert (a["ttft_attainment"], a["tpot_attainment"], a["attainment"]) == (0.5, 1.0, 0.5)
    assert (b["ttft_attainment"], b["tpot_attainment"], b["attainment"], b["errors"]) == (0.5, 0.0, 0.0, 1)
    assert b["error_messages"] == ["HTTP 503"] and a["error_messages"] == []
    assert summary["overall"]["attainment"] == 0.25 and summary["overall"]["goodput_rps"] == 0.5
    low, high = summary["overall"]["ttft_attainment_ci95"]
    assert low < 0.5 < high  # 2 of 4 on time: anything from rare to usual


def test_wilson_interval_matches_hand_worked_values_and_stays_within_0_and_1():
    # 469 of 475 on time (0.987): the interval spans the 99% target, so that point neither holds nor misses it.
    assert wilson_interval(469, 475) == pytest.approx([0.9727, 0.9942], abs=1e-4)
    assert wilson_interval(475, 475)[1] == 1.0 and wilson_interval(475, 475)[0] == pytest.approx(0.992, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 0) == [0.0, 1.0]


def test_policy_registry_writes_policy_slos_memory_share_and_absolute_paths():
    config = ROOT / "configs" / "prism-8models.yaml"
    slos = {"llama-1b-1": {"ttft_p95_s": 0.02, "tpot_p95_s": 0.002}}
    registry = policy_registry(config, "static", slos, slo_scale=5.0, gpu_memory_utilization=0.52)
    assert registry["scheduler"]["policy"] == "static" and registry["memory"]["gpu_memory_utilization"] == 0.52
    model = next(m for m in registry["models"] if m["name"] == "llama-1b-1")
    assert model["slo"] == pytest.approx({"ttft_s": 0.1, "tpot_s": 0.01})
    assert Path(model["config"]).is_absolute() and Path(model["config"]).is_file()
    assert policy_registry(config, "prism", None, 5.0)["memory"]["gpu_memory_utilization"] == 0.92  # the file's own
    assert registry["scheduler"]["overlap_steps"] is True
    serial = policy_registry(config, "prism", None, 5.0, overlap_steps=False)
    assert serial["scheduler"]["overlap_steps"] is False
    from controller.registry import Registry

    assert Registry.model_validate(serial).scheduler.overlap_steps is False  # a field the registry knows
    by_request = policy_registry(config, "prism", None, 5.0, tpot_target="request")
    assert Registry.model_validate(by_request).scheduler.tpot_target == "request"
    assert "tpot_target" not in registry["scheduler"]  # unless asked, the registry's own (default: request)


def test_a_ci_sized_replay_against_the_demo_server(tmp_path, demo_server):
    out = tmp_path / "replay.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "replay.py"), "--url", demo_server.base_url,
        "--trace", str(write_arena(tmp_path / "arena.csv")), "--models", "smollm2-135m-instruct", "tiny-llama-random",
        "--streams", "0", "1", "--rate-scales", "2", "--duration", "3", "--calibrate", "2", "--out", str(out),
    ]
    subprocess.run(command, check=True, timeout=300, cwd=ROOT)
    result = json.loads(out.read_text())
    point = result["policies"]["server"][0]
    assert point["overall"]["requests"] == 8 and point["overall"]["errors"] == 0  # trace times <= 6 s at scale 2
    assert list(point["device_busy"]) == ["cpu"] and point["device_busy"]["cpu"] > 0  # from the workers' heartbeats
    assert set(point["steps"]) <= {"smollm2-135m-instruct", "tiny-llama-random"} and point["steps"]  # each model's steps
    assert all(s["steps"] > 0 and s["tokens_per_step"] >= 1 for s in point["steps"].values())
    assert set(point["per_model"]) == {"smollm2-135m-instruct", "tiny-llama-random"}
    assert all(0.0 <= m["attainment"] <= 1.0 for m in point["per_model"].values())
    assert set(result["dedicated_p95"]) == {"smollm2-135m-instruct", "tiny-llama-random"}
    assert all(len(p95["samples"]) == 2 and all(s["ttft_s"] > 0 for s in p95["samples"]) for p95 in result["dedicated_p95"].values())
    assert set(point["gc"]) == {"client", "controller", "worker:cpu"}  # every process that timestamps or serves a token
    # CPU of the processes it can see from outside a server it did not start: itself and the workers (their pids from /health)
    # The controller's own count of the same requests (the demo registry's SLOs): every request finished in the point
    assert set(point["server_ttft_attainment"]) == {"smollm2-135m-instruct", "tiny-llama-random", "overall"}
    assert all(0.0 <= share <= 1.0 for share in point["server_ttft_attainment"].values())
    state = point["state"]  # sampled from /metrics while the point ran (3 s or more, every 0.5 s)
    assert set(state["models"]) == {"smollm2-135m-instruct", "tiny-llama-random"} and list(state["devices"]) == ["cpu"]
    assert len(state["series"]) >= 4 and all(s["running"] >= 0 and s["waiting"] >= 0 for s in state["series"])
    assert 0 <= state["devices"]["cpu"]["min_free_pages"] and state["devices"]["cpu"]["max_kv_pages"] >= 0
    assert set(point["cpu_share"]) == {"client", "worker:cpu"} and all(share > 0 for share in point["cpu_share"].values())
    assert all(0 <= g["full_collections"] <= g["collections"] and 0 <= g["pauses_over_10ms"] <= g["collections"]
               for g in point["gc"].values())


def _gc(full_pauses_s: list[float], young: int) -> GcStats:
    counts = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1) for _ in range(3)]
    counts[0][0] = young
    for pause in full_pauses_s:
        counts[2][next(i for i, bound in enumerate(GC_PAUSE_BUCKETS_S) if pause <= bound)] += 1
    return GcStats(counts, [0.0001 * young, 0.0, sum(full_pauses_s)], 0)


def test_gc_summary_of_a_point_from_the_servers_histogram_and_the_clients_own_counts():
    before = {"worker:cuda:0": _gc([0.12], young=100), "client": _gc([], young=5)}
    after = {"worker:cuda:0": _gc([0.12, 0.003, 0.2], young=900), "client": _gc([0.02], young=8)}
    text = Metrics(None, lambda: [("worker:cuda:0", after["worker:cuda:0"])]).render().decode()
    assert gc_stats(text)["worker:cuda:0"].pause_counts == after["worker:cuda:0"].pause_counts  # the histogram read back
    summary = gc_summary(before, {**gc_stats(text), "client": after["client"]})
    assert summary["worker:cuda:0"] == {"collections": 802, "full_collections": 2, "pause_s": pytest.approx(0.283),
                                        "pauses_over_10ms": 1, "longest_pause_under_s": 0.25}
    assert summary["client"] == {"collections": 4, "full_collections": 1, "pause_s": pytest.approx(0.0203),
                                 "pauses_over_10ms": 1, "longest_pause_under_s": 0.025}


def test_step_summary_turns_counter_deltas_into_per_model_step_figures():
    before = {("prism:device_busy_seconds", "cuda:0"): 10.0, ("prism:model_steps", "a"): 100,
              ("prism:model_scheduled_tokens", "a"): 1000, ("prism:model_step_device_seconds", "a"): 8.0}
    after = {("prism:device_busy_seconds", "cuda:0"): 15.0, ("prism:model_steps", "a"): 300,
             ("prism:model_scheduled_tokens", "a"): 5000, ("prism:model_step_device_seconds", "a"): 12.0,
             ("prism:num_preemptions", "a"): 3, ("prism:model_steps", "idle"): 0,
             ("prism:prefill_speed_estimate_tokens_per_second", "a"): 12345.6}
    before[("prism:prefill_speed_estimate_tokens_per_second", "a")] = 4096.0  # a gauge: its value at the end counts
    busy, steps = step_summary(before, after, wall_s=10.0)
    assert busy == {"cuda:0": 0.5}
    assert steps == {"a": {"steps": 200, "tokens_per_step": 20.0, "preemptions": 3, "device_share": 0.4,
                           "prefill_speed_estimate": 12346}}  # idle: no steps


def test_sse_lines_split_only_at_line_feeds_across_chunk_boundaries():
    import asyncio

    import httpx

    from benchmarks.replay import sse_lines

    event = "data: " + json.dumps({"text": "a\u2028b\x85c\rd"}, ensure_ascii=False)  # JSON may hold these raw
    body = (event + "\r\n\r\n" + "data: [DONE]\n\n").encode()

    async def chunks():  # one byte at a time: every boundary, inside UTF-8 sequences too
        for i in range(len(body)):
            yield body[i:i + 1]

    async def lines() -> list[bytes]:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=chunks()))
        async with httpx.AsyncClient(transport=transport) as client:
            async with client.stream("GET", "http://replay.test/") as response:
                return [line async for line in sse_lines(response)]

    got = asyncio.run(lines())
    assert got == [event.encode(), b"", b"data: [DONE]", b""]
    assert json.loads(got[0][6:])["text"] == "a\u2028b\x85c\rd"


def test_state_samples_say_the_most_running_and_the_fewest_free_pages():
    from benchmarks.replay import StateSampler, state_gauges

    def metrics(running: int, waiting: int, free: int) -> str:
        return (f'prism:num_requests_running{{model_name="a"}} {running}\n'
                f'prism:num_requests_waiting{{model_name="a"}} {waiting}\n'
                f'prism:pool_pages{{device="cuda:0",kind="free"}} {free}\n'
                f'prism:pool_pages{{device="cuda:0",kind="kv"}} {100 - free}\n')

    sampler = StateSampler("http://unused")
    sampler.samples = [{"t_s": t, **state_gauges(metrics(*values))} for t, values in ((0.5, (3, 0, 40)), (1.0, (128, 7, 2)), (1.5, (90, 0, 10)))]
    summary = sampler.summary()
    assert summary["models"] == {"a": {"max_running": 128, "max_waiting": 7}}
    assert summary["devices"] == {"cuda:0": {"min_free_pages": 2, "max_kv_pages": 98}}
    assert [s["running"] for s in summary["series"]] == [3, 128, 90] and summary["series"][1]["free_pages"] == {"cuda:0": 2}


def test_client_processes_below_one_are_refused_with_a_clear_error():
    command = [sys.executable, str(ROOT / "benchmarks" / "replay.py"), "--url", "http://127.0.0.1:9", "--models", "m",
               "--client-processes", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "--client-processes: must be at least 1, not 0" in done.stderr
