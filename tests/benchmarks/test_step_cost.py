"""benchmarks/step_cost.py on the CPU: its measurement leaves the batch as it found it, and times each path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks import step_cost
from tests.factories import make_pool, make_spec, make_tiny_checkpoint
from tests.workers.test_mixed_steps import EagerGraphs
from workers.offline import OfflineRunner

ROOT = Path(__file__).resolve().parents[2]


def test_a_measurement_times_every_path_and_frees_every_sequence(tmp_path):
    spec = make_spec(make_tiny_checkpoint("llama", tmp_path, seed=5), name="bench", max_num_batched_tokens=512)
    runner = OfflineRunner(spec, "cpu", make_pool(256 * 1024**2))
    try:
        graphs = runner.engine.graphs = EagerGraphs(runner.engine)
        runner.engine.split_min_decodes = 4
        point = step_cost.measure(runner, 6, [16, 40], 2, spec.hf_config["vocab_size"])
        assert point["decodes"] == 6 and point["split"] is True
        for key in ("decode_graph", "mixed_16", "mixed_40", "decode_eager", "mixed_16_eager", "mixed_40_eager"):
            assert 0 < point[key]["launch_s"] <= point[key]["step_s"], key
        assert graphs.can_run(1)  # the eager-only block restored the graphs
        assert runner.engine.kv.num_used_blocks == 0 and not runner.scheduler.has_work()
    finally:
        runner.close()


def test_an_unknown_shape_is_refused_with_the_known_ones():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--model", "llama-9b"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no shape 'llama-9b'" in done.stderr and "llama-3.1-8b" in done.stderr
