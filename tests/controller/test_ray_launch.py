"""Workers launched on Ray: `prism serve` with `ray: {address: local, cpu_workers: 2}` starts a local Ray
instance and two worker actors running `prism worker`, which join over the channel; chat works through
them; a killed worker actor is replaced by Ray and its models are served again; stopping the server
leaves no actor, worker or Ray process behind."""

from __future__ import annotations

import os
import signal

import openai
import pytest

from tests.controller.server_process import default_registry, pid_alive, start_server, stop_server, wait_until, write_registry

SMOL = "smollm2-135m-instruct"
WORKERS = {"ray-cpu-0", "ray-cpu-1"}


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_smollm2):
    registry = default_registry()
    registry["devices"] = []
    registry["ray"] = {"address": "local", "cpu_workers": 2, "cpus_per_worker": 0.5, "local_num_cpus": 2}
    path = write_registry(tmp_path_factory.mktemp("ray-launch"), registry)
    process = start_server(path)
    yield process
    stop_server(process)


def served(server, model: str) -> bool:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return reply.usage.completion_tokens > 0


def both_ready(server) -> dict:
    workers = server.health()["workers"]
    return workers if set(workers) == WORKERS and all(w["state"] == "ready" for w in workers.values()) else {}


def test_workers_run_as_ray_actors_and_serve(server):
    workers = wait_until(lambda: both_ready(server), 120, 0.2, "both Ray workers ready")
    for worker in workers.values():
        actor = parent_pid(worker["pid"])
        assert "WorkerActor" in command_line(actor)  # a Ray actor process runs `prism worker` as its child
        assert "workers.main" in command_line(worker["pid"])
    assert served(server, SMOL)


def test_a_killed_worker_actor_is_replaced_and_its_models_served_again(server):
    workers = wait_until(lambda: both_ready(server), 120, 0.2, "both Ray workers ready")
    home = server.health()["models"][SMOL]["device"]
    old_worker = workers[home]["pid"]
    actor = parent_pid(old_worker)
    os.kill(actor, signal.SIGKILL)
    replaced = wait_until(lambda: (w := both_ready(server)) and w[home]["pid"] != old_worker and w, 180, 0.2,
                          f"{home} back with a new process")
    assert parent_pid(replaced[home]["pid"]) != actor
    wait_until(lambda: not pid_alive(old_worker) and not pid_alive(actor), 30, 0.2, "the old worker and actor gone")
    assert served(server, SMOL)
    assert f"worker {home} joins from the network" in server.log()


def test_stopping_the_server_leaves_no_actor_worker_or_ray_process(tmp_path, prepared_smollm2):
    registry = default_registry()
    registry["devices"] = []
    registry["ray"] = {"address": "local", "cpu_workers": 1, "cpus_per_worker": 0.5, "local_num_cpus": 1}
    process = start_server(write_registry(tmp_path, registry))
    try:
        worker = wait_until(lambda: process.health()["workers"].get("ray-cpu-0", {}).get("pid"), 120, 0.2, "the Ray worker")
        actor = parent_pid(worker)
        ray_processes = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if pid_alive(pid)
                         and parent_pid_or_none(pid) == process.process.pid]
    finally:
        stop_server(process)
    assert "Finished server process" in process.log()  # a graceful stop, not the test's kill
    # The worker exits on its parent-death signal when its actor is killed, and Ray's own processes when
    # it shuts down: give them the time a worker's shutdown takes.
    wait_until(lambda: not any(map(pid_alive, [worker, actor, *ray_processes])), 30, 0.2, "no process left")


def parent_pid_or_none(pid: int) -> int | None:
    try:
        return parent_pid(pid)
    except OSError:
        return None
