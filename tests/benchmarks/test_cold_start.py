"""The cold-start benchmark, CI-sized: tiny random models on the CPU, measured from the client through the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-llama.json"


def test_cold_start_reports_both_activations_a_burst_and_the_floor(tmp_path):
    out = tmp_path / "cold_start.json"
    command = [sys.executable, "benchmarks/cold_start.py", "--device", "cpu", "--measure", str(TINY), "--resident-config", str(TINY),
               "--burst-config", str(TINY), "--burst", "3", "--resident-rate", "5", "--resident-ttft-slo", "2.0",
               "--cpu-budget", "512MiB", "--host-store", "1GiB", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "cold_start" and result["card"] == "cpu" and result["command"].startswith("python")
    (row,) = result["models"]
    assert row["weight_bytes"] > 0 and 0 < row["pcie_floor_s"] < 1
    assert 0 < row["first_activation_ttft_s"] < 60 and 0 < row["reactivation_ttft_s"] < 60
    assert row["worker_reactivation"]["map_copy_s"] >= 0 and row["worker_reactivation"]["build_s"] < 0.05  # built once, ahead
    assert len(result["burst"]["ttft_s"]) == 3 and result["burst_s"] >= max(result["burst"]["ttft_s"].values())
    resident = result["burst"]["resident_ttft_s"]
    assert resident["count"] >= 1 and 0 < resident["p50"] <= resident["max"]
    assert result["serve_to_all_prepared_s"] > 0
