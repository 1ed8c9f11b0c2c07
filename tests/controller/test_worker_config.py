"""What the controller tells the workers it starts: the registry's options, in one message, and nothing on
the command line beyond how to reach the controller."""

from __future__ import annotations

import textwrap

import pytest

from controller.registry import load_registry
from workers.contract import messages as m
from workers.main import parse_args
from workers.worker import pool_budget_bytes


def registry(tmp_path, scheduler: str = "{}", memory: str = "{}"):
    (tmp_path / "c.json").write_text("{}")
    path = tmp_path / "registry.yaml"
    path.write_text(textwrap.dedent(f"""
        scheduler: {scheduler}
        memory: {memory}
        models: [{{name: m1, load_format: dummy, config: c.json, tokenizer: /}}]
    """))
    return load_registry(path)


def test_the_worker_configuration_carries_the_registrys_options_through_the_channel(tmp_path):
    config = registry(
        tmp_path, "{policy: prism, tpot_target: token, overlap_steps: false}",
        "{cpu_budget_bytes: 1GiB, gpu_memory_utilization: 0.5, gpu_reserved_bytes: 512MiB, host_store_dir: /tmp}",
    ).worker_config("prism-weights-7-", tmp_path / "cache")
    received = m.decode_to_worker(m.encode(m.Configure(config)))
    assert received == m.Configure(config)
    assert (config.local_policy, config.tpot_target, config.overlap_steps) == ("prism", "token", False)
    assert (config.cpu_budget_bytes, config.gpu_memory_utilization, config.gpu_reserved_bytes) == (2**30, 0.5, 2**29)
    assert (config.host_store_dir, config.store_prefix) == ("/tmp", "prism-weights-7-")
    assert config.compile_cache_dir == str(tmp_path / "cache" / "triton")
    assert pool_budget_bytes(config, "cpu") == 2**30


def test_baseline_workers_step_first_come_first_served_with_the_registrys_defaults(tmp_path):
    config = registry(tmp_path, "{policy: static}").worker_config("p-", tmp_path)
    assert (config.local_policy, config.tpot_target, config.overlap_steps) == ("fcfs", "request", True)
    assert config.gpu_reserved_bytes == 2 * 2**30 and config.page_bytes == 2 * 2**20


def test_the_worker_command_line_takes_no_configuration():
    args = parse_args(["--controller", "tcp://127.0.0.1:1", "--device", "cpu"])
    assert (args.controller, args.device) == ("tcp://127.0.0.1:1", "cpu")
    with pytest.raises(SystemExit):
        parse_args(["--controller", "tcp://127.0.0.1:1", "--budget-bytes", "1"])


def test_devices_auto_counts_the_gpus_cuda_visible_devices_leaves():
    from controller.devices import resolve_devices, visible_gpus

    assert [visible_gpus(4, v) for v in (None, "0,1", "", "-1", "2,-1,3", "0,1,2,3,4,5")] == [4, 2, 0, 0, 1, 4]
    assert resolve_devices(["cpu:0", "cpu:1"]) == ["cpu:0", "cpu:1"]


def test_a_gpu_this_machine_lacks_is_refused_at_start(tmp_path, monkeypatch):
    """Regression: `devices: [cuda:0]` on a machine without a GPU printed "listening", refused connections and
    restarted its worker with a traceback every few seconds."""
    from controller import devices

    monkeypatch.setattr(devices, "usable_gpus", lambda: 1)
    assert devices.resolve_devices(["cuda:0"]) == ["cuda:0"]
    with pytest.raises(devices.CannotStart, match=r"lists cuda:1, but this machine has 1 visible GPU"):
        devices.resolve_devices(["cuda:0", "cuda:1"])
    monkeypatch.setattr(devices, "usable_gpus", lambda: 0)
    with pytest.raises(devices.CannotStart, match="no NVIDIA GPU"):
        devices.resolve_devices(["cuda:0"])
