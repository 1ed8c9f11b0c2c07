"""The CPU simulator of one device: the real local scheduler, a modelled step time, KV as a byte budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.replay import TraceRequest
from benchmarks.simulate import Device, SimModel, simulate

ROOT = Path(__file__).resolve().parents[2]
DEVICE = Device(bandwidth_bytes_s=1e12, flops=1e12, overhead_s=0.0, eager_s_per_layer=1e-3, split_min_decodes=0, prefill_graph_tokens=0)
SLOS = {"m": {"ttft_p95_s": 1.0, "tpot_p95_s": 1.0}, "n": {"ttft_p95_s": 1.0, "tpot_p95_s": 1.0}}


def model(name: str = "m") -> SimModel:
    return SimModel(name, weight_bytes=10**9, kv_bytes_per_token=1000, flops_per_token=1e9, num_layers=2,
                    max_num_seqs=8, max_num_batched_tokens=512)


def test_one_request_takes_an_eager_prefill_step_then_one_weight_read_per_token():
    jobs = [(TraceRequest(0.0, 0, 100, 3), "m")]
    point = simulate([model()], jobs, "prism", 10**9, SLOS, 1.0, 1.0, 10.0, DEVICE)
    m = point["per_model"]["m"]
    prefill_s = (1e9 + 100 * 1000) / 1e12 + 100 * 1e9 / 1e12  # weights + KV read, compute (longer than 2 eager layers' launches)
    decode_s = [(1e9 + n * 1000) / 1e12 for n in (101, 102)]  # attends to 101, then 102 tokens
    assert m["ttft_p50_s"] == pytest.approx(prefill_s)
    assert m["tpot_p50_s"] == pytest.approx(sum(decode_s) / 2)
    assert point["simulated_s"] == pytest.approx(prefill_s + sum(decode_s))
    assert point["steps"] == {"m": {"steps": 3, "tokens_per_step": 34.0, "device_share": 1.0}}  # 100 + 1 + 1 tokens
    assert point["device_busy"] == 1.0


def test_static_splits_the_kv_memory_so_a_burst_on_one_model_waits_where_prism_lends_it_the_pool():
    # 4 KV blocks of 16 tokens in all. A 30-token prompt plus 2 outputs needs 2 blocks: two at once need 4.
    kv_bytes = 4 * 16 * 1000
    jobs = [(TraceRequest(0.0, 0, 30, 3), "m"), (TraceRequest(0.0, 0, 30, 3), "m"), (TraceRequest(5.0, 0, 1, 2), "n")]
    models = [model("m"), model("n")]
    slos = {name: {"ttft_p95_s": 0.0625, "tpot_p95_s": 1.0} for name in ("m", "n")}
    prism = simulate(models, jobs, "prism", kv_bytes, slos, 1.0, 1.0, 10.0, DEVICE)["per_model"]["m"]
    static = simulate(models, jobs, "static", kv_bytes, slos, 1.0, 1.0, 10.0, DEVICE)["per_model"]["m"]
    assert prism["requests"] == static["requests"] == 2
    # Prism prefills both prompts in one step (60 tokens: 61 ms, both on time). Static has room for one:
    # 31 ms, and the other starts after it finishes (two 1 ms decodes), first token at ~64 ms: late.
    assert prism["ttft_attainment"] == 1.0 and prism["ttft_p50_s"] == pytest.approx(0.061, abs=1e-3)
    assert static["ttft_attainment"] == 0.5 and static["ttft_p50_s"] == pytest.approx(0.031, abs=1e-3)


def mixed_plan():
    """A step of three decodes (5 tokens of context each) and a 5-token prompt, and its device work on
    DEVICE's numbers: the weights and 20 tokens of KV read, 5 tokens computed."""
    from scheduler.local import ScheduledChunk, StepPlan
    from scheduler.sequence import Sequence

    decodes = [Sequence(f"d{i}", "m", [1] * 4, 8, 0.0) for i in range(3)]
    for seq in decodes:
        seq.output_token_ids.append(2)
    prompt = Sequence("p", "m", [1] * 5, 8, 0.0)
    plan = StepPlan("m", [*(ScheduledChunk(s, 4, 1) for s in decodes), ScheduledChunk(prompt, 0, 5)], [], [])
    return plan, 1e9 / 1e12 + (3 * 5 + 5) * 1000 / 1e12 + 5 * 1e9 / 1e12


def test_an_eager_step_takes_at_least_its_launches_and_a_split_one_reads_the_weights_twice():
    m = model()
    plan, work_s = mixed_plan()
    slow_host = Device(bandwidth_bytes_s=1e12, flops=1e12, overhead_s=0.0, eager_s_per_layer=5e-3, split_min_decodes=0, prefill_graph_tokens=0)
    assert m.step_s(plan, slow_host) == pytest.approx(2 * 5e-3)  # launch-bound: two layers of launches
    assert m.step_s(plan, DEVICE) == pytest.approx(work_s)  # device-bound
    split = Device(bandwidth_bytes_s=1e12, flops=1e12, overhead_s=0.0, eager_s_per_layer=1e-3, split_min_decodes=3, prefill_graph_tokens=0)
    assert m.step_s(plan, split) == pytest.approx(work_s + 1e9 / 1e12)  # the graph and the prefill each read the weights


def test_a_step_within_the_prefill_graphs_pays_no_launch_floor_and_a_larger_one_does():
    m = model()
    plan, work_s = mixed_plan()
    slow = dict(bandwidth_bytes_s=1e12, flops=1e12, overhead_s=0.0, eager_s_per_layer=5e-3)
    assert m.step_s(plan, Device(**slow, split_min_decodes=0, prefill_graph_tokens=8)) == pytest.approx(work_s)  # 8 tokens: graphed whole
    assert m.step_s(plan, Device(**slow, split_min_decodes=0, prefill_graph_tokens=7)) == pytest.approx(2 * 5e-3)  # one token over: eager
    # split, only the prompt's 5 tokens go to a prefill graph: graphed, the weights read twice
    assert m.step_s(plan, Device(**slow, split_min_decodes=3, prefill_graph_tokens=5)) == pytest.approx(work_s + 1e9 / 1e12)


def test_the_command_line_writes_a_result_per_policy_and_scale(tmp_path):
    slos = {name: {"ttft_p95_s": 0.03, "tpot_p95_s": 0.005} for name in ("llama-8b-1", "llama-8b-2", "llama-8b-3", "llama-3b-1",
                                                                        "llama-1b-1", "llama-1b-2", "llama-1b-3", "llama-1b-4")}
    (tmp_path / "slos.json").write_text(json.dumps({"dedicated_p95": slos}))  # a replay result's layout
    trace = tmp_path / "trace.csv"
    trace.write_text("req_time_s,adapter_rank,prompt_len,output_len\n" + "".join(f"{i * 0.5},{2 + i % 2},{20 + i},{4}\n" for i in range(12)))
    out = tmp_path / "sim.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simulate.py"), "--config", str(ROOT / "configs" / "prism-8models.yaml"),
                    "--slos", str(tmp_path / "slos.json"), "--trace", str(trace), "--streams", "2", "3", "4", "5", "6", "7", "8", "9",
                    "--rate-scales", "1", "2", "--duration", "10", "--tpot-targets", "token", "request", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["policies"]) == {"prism", "prism, tpot_target=token", "static"}  # the default unnamed
    for points in result["policies"].values():
        assert [p["rate_scale"] for p in points] == [1.0, 2.0]
        assert points[0]["overall"]["requests"] == 12 and points[0]["overall"]["errors"] == 0
        assert set(points[0]["per_model"]) == {"llama-8b-1", "llama-8b-2"}  # streams 2 and 3 carry the trace


def test_with_overlap_the_model_whose_step_runs_is_not_planned_next():
    # m is always the more urgent (tight SLOs); n's prefill can only go first while m's step is on the device.
    jobs = [(TraceRequest(0.0, 0, 100, 3), "m"), (TraceRequest(0.0, 0, 100, 3), "n")]
    slos = {"m": {"ttft_p95_s": 0.2, "tpot_p95_s": 0.001}, "n": {"ttft_p95_s": 10.0, "tpot_p95_s": 1.0}}
    prefill_s = (1e9 + 100 * 1000) / 1e12 + 100 * 1e9 / 1e12
    decode_s = [(1e9 + n * 1000) / 1e12 for n in (101, 102)]
    overlapped = simulate([model("m"), model("n")], jobs, "prism", 10**9, slos, 1.0, 1.0, 10.0, DEVICE)
    serial = simulate([model("m"), model("n")], jobs, "prism", 10**9, slos, 1.0, 1.0, 10.0, DEVICE, overlap=False)
    assert overlapped["per_model"]["n"]["ttft_p50_s"] == pytest.approx(2 * prefill_s)  # right behind m's prefill
    assert serial["per_model"]["n"]["ttft_p50_s"] == pytest.approx(2 * prefill_s + sum(decode_s))  # after m is done
    assert overlapped["simulated_s"] == pytest.approx(serial["simulated_s"])  # the same steps, back to back


def test_the_pool_backing_counts_what_the_real_memory_layer_costs():
    """Blocks of 1.25 MiB in 4 MiB of KV: a byte budget fits three at once; the real pool fits two, since
    each model's KV space keeps a scratch block (the decode graphs' padding rows) as the engine's does."""
    mib = 2**20
    m = SimModel("m", weight_bytes=256 * mib, kv_bytes_per_token=80 * 1024, flops_per_token=1e9, num_layers=2,
                 max_num_seqs=8, max_num_batched_tokens=512)
    jobs = [(TraceRequest(0.0, 0, 10, 3), "m") for _ in range(3)]  # 13 tokens: one block each
    points = {backing: simulate([m], jobs, "prism", 4 * mib, SLOS, 1.0, 1.0, 10.0, DEVICE, kv_backing=backing)
              for backing in ("bytes", "pool")}
    assert points["bytes"]["steps"]["m"]["steps"] == 3  # one prefill step, then two decode steps for all three
    assert points["pool"]["steps"]["m"]["steps"] > 3  # the third waited for a block: its own steps after
    assert points["pool"]["simulated_s"] > points["bytes"]["simulated_s"]
    assert points["pool"]["memory"] == {"fewest_free_pages": 0, "pool_pages": 130}  # 128 of weights, 2 of KV
    assert "memory" not in points["bytes"]


def test_with_ample_memory_the_pool_backing_changes_nothing():
    jobs = [(TraceRequest(0.1 * i, 0, 50 + 10 * i, 4), name) for i in range(6) for name in ("m", "n")]
    by_bytes = simulate([model("m"), model("n")], jobs, "prism", 10**9, SLOS, 1.0, 1.0, 10.0, DEVICE)
    by_pool = simulate([model("m"), model("n")], jobs, "prism", 10**9, SLOS, 1.0, 1.0, 10.0, DEVICE, kv_backing="pool")
    assert by_pool["per_model"] == by_bytes["per_model"] and by_pool["simulated_s"] == by_bytes["simulated_s"]
