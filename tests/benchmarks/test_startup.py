"""The start-up and recovery benchmark on the CPU demo registry: serve, every model prepared, kill -9, served again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_startup_reports_readiness_preparation_and_recovery_after_kill_9(tmp_path, prepared_smollm2):
    out = tmp_path / "startup.json"
    subprocess.run([sys.executable, "benchmarks/startup.py", "--config", "configs/demo.yaml", "--out", str(out)], cwd=ROOT,
                   check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "startup" and result["card"] == "cpu" and result["num_models"] == 2
    assert 0 < result["serve_to_ready_s"] and result["serve_to_all_staged_s"] <= result["serve_to_all_prepared_s"]
    assert result["not_prepared"] == {}
    assert set(result["kill9_ttft_s"]) == set(result["resident_at_kill"]) == {"smollm2-135m-instruct", "tiny-llama-random"}
    assert 0 < result["kill9_to_all_served_s"] < 120 and result["kill9_to_all_served_s"] == max(result["kill9_ttft_s"].values())
    assert 0 < result["kill9_to_worker_ready_s"] < result["kill9_to_all_served_s"]
    assert len(result["restore_activations"]) == 2  # both models were brought back by the restarted worker
