"""Workers that join over the network: a controller with no device of its own (`devices: []`) listens on
a configured address; workers started apart with `prism worker --controller tcp://HOST:PORT` join with
the channel's secret (from the variable `server.worker_secret_env` names) and serve. A worker with another
secret is refused and gets nothing; a worker that leaves has its models placed on another."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import openai
import pytest

from tests.controller.server_process import default_registry, start_server, stop_server, wait_until, write_registry

SMOL = "smollm2-135m-instruct"
SECRET_ENV = "PRISM_TEST_CHANNEL_SECRET"
SECRET = "remote-worker-test-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_worker(address: str, worker_id: str, secret: str) -> subprocess.Popen:
    """`prism worker` as an operator on another host starts it: its own process, not the controller's child."""
    command = [sys.executable, "-m", "controller.cli", "worker", "--controller", address, "--device", "cpu",
               "--worker-id", worker_id, "--secret-env", SECRET_ENV]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, SECRET_ENV: secret}, start_new_session=True)


def stop_worker(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prepared_smollm2):
    address = f"tcp://127.0.0.1:{free_port()}"
    registry = default_registry()
    registry["devices"] = []
    registry["server"] = {**registry.get("server", {}), "worker_listen": address.removeprefix("tcp://"),
                          "worker_secret_env": SECRET_ENV, "worker_heartbeat_timeout_s": 3.0}
    path = write_registry(tmp_path_factory.mktemp("remote-worker"), registry)
    workers = {wid: start_worker(address, wid, SECRET) for wid in ("remote-a", "remote-b")}
    server = None
    try:
        server = start_server(path, env={SECRET_ENV: SECRET})  # healthy once the workers that joined so far are ready
        wait_until(lambda: all_joined(server, workers), 120, 0.2, "both workers joined and ready")
        yield server, address, workers
    finally:
        if server is not None:
            stop_server(server)
        for process in workers.values():
            stop_worker(process)


def all_joined(server, workers: dict) -> bool:
    joined = server.health()["workers"]
    return set(joined) == set(workers) and all(w["state"] == "ready" for w in joined.values())


def served(server, model: str) -> bool:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return reply.usage.completion_tokens > 0


def test_workers_started_apart_join_with_the_secret_and_serve(cluster):
    server, _, workers = cluster
    health = server.health()
    assert set(health["workers"]) == set(workers)
    assert {w["pid"] for w in health["workers"].values()} == {p.pid for p in workers.values()}
    assert all(w["joined"] and w["device"] == "cpu" for w in health["workers"].values())
    assert health["models"][SMOL]["device"] in workers
    assert served(server, SMOL)
    assert "worker remote-a joins from the network" in server.log()


def test_a_worker_with_another_secret_is_refused_and_gets_nothing(cluster):
    server, address, _ = cluster
    intruder = start_worker(address, "intruder", "not-the-secret")
    try:
        assert intruder.wait(30) == 3  # refused at the handshake: it says so and exits
    finally:
        output = stop_worker(intruder)
    assert "refused this worker's credentials" in output
    assert "intruder" not in server.health()["workers"]
    assert wait_until(lambda: "failed the handshake" in server.log(), 10, what="the refusal logged")
    assert served(server, SMOL)


def test_a_worker_that_leaves_has_its_models_served_by_another(cluster):
    server, _, workers = cluster
    home = server.health()["models"][SMOL]["device"]
    other = next(wid for wid in workers if wid != home)
    os.kill(workers[home].pid, signal.SIGKILL)  # no goodbye: its heartbeats stop
    wait_until(lambda: home not in server.health()["workers"], 30, 0.2, f"{home} gone from /health")
    assert served(server, SMOL)
    assert server.health()["models"][SMOL]["device"] == other
    assert f"worker {home} sent no heartbeat" in server.log()
