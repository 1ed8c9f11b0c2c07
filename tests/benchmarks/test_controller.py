"""The controller-overhead benchmark, CI-sized: it runs end to end and accounts for every token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_controller_benchmark_measures_latency_both_ways_and_the_cost_of_streams(tmp_path):
    out = tmp_path / "controller.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "controller.py"), "--repeats", "2", "--tokens", "4",
                    "--streams", "1", "3", "--out", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    latency = result["latency"]
    for side in ("endpoint", "engine_in_process"):
        assert latency[side]["ttft_s"] > 0 and latency[side]["tpot_s"] > 0
    assert latency["overhead_ttft_ms"] == 1e3 * (latency["endpoint"]["ttft_s"] - latency["engine_in_process"]["ttft_s"])
    assert [c["streams"] for c in result["streaming_cost"]] == [1, 3]
    assert [c["tokens"] for c in result["streaming_cost"]] == [4, 12]  # every requested token was streamed
    # CPU time comes in clock ticks (10 ms): a run this small may measure none, never a negative amount.
    assert all(c["controller_cpu_us_per_token"] >= 0 and c["tokens_per_s"] > 0 for c in result["streaming_cost"])
