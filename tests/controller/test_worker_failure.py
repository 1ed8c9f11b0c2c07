"""Overload, a killed worker, and shutdown, against the real server (subprocess) with tight limits."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest

from tests.controller.server_process import (
    default_registry,
    pid_alive,
    start_server,
    stop_server,
    wait_until,
    write_registry,
)

SMOL = "smollm2-135m-instruct"
LONG = dict(max_tokens=2000, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_smollm2):
    registry = default_registry()
    registry["server"].update(max_queued_per_model=2, worker_start_timeout_s=1.0)
    config = write_registry(tmp_path_factory.mktemp("failure"), registry)
    server = start_server(config)
    yield server
    stop_server(server)


def make_client(server, **kwargs):
    return openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120, **kwargs)


def test_a_full_queue_answers_429_with_retry_after(server):
    async def scenario():
        client = make_client(server)
        streams = [await client.completions.create(model=SMOL, prompt="Tell a story", stream=True, **LONG) for _ in range(2)]
        for stream in streams:  # both are running on the worker
            await stream.__anext__()
        with pytest.raises(openai.RateLimitError) as info:
            await client.completions.create(model=SMOL, prompt="one more", max_tokens=5)
        for stream in streams:
            await stream.close()
        return info.value

    error = asyncio.run(scenario())
    assert error.status_code == 429 and int(error.response.headers["retry-after"]) >= 1
    assert error.body["type"] == "rate_limit_error"


def test_a_killed_worker_fails_its_requests_at_once_and_comes_back(server):
    old_pid = server.worker_pid()
    wait_until(lambda: server.health()["workers"]["cpu"]["models"][SMOL]["num_running"] == 0, 20, what="an idle worker")

    async def scenario():
        client = make_client(server)
        stream = await client.completions.create(model=SMOL, prompt="Tell a story", stream=True, **LONG)
        await stream.__anext__()
        blocking = asyncio.ensure_future(client.completions.create(model=SMOL, prompt="Another story", **LONG))
        wait_started = time.monotonic()
        while server.health()["workers"]["cpu"]["models"][SMOL]["num_running"] < 2:
            assert time.monotonic() - wait_started < 20, "both requests should be running"
            await asyncio.sleep(0.05)
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(openai.APIError) as streamed:
            async for _ in stream:
                pass
        with pytest.raises(openai.InternalServerError) as plain:
            await blocking
        return time.monotonic() - killed_at, streamed.value, plain.value

    elapsed, streamed, plain = asyncio.run(scenario())
    assert elapsed < 5, f"in-flight requests took {elapsed:.1f} s to fail"
    assert "exited with signal 9" in str(streamed) and "exited with signal 9" in plain.body["message"]
    assert plain.status_code == 500

    # While it restarts, a new request waits up to worker_start_timeout_s (1 s here), then gets 503.
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as unavailable:
        client.completions.create(model=SMOL, prompt="hello", max_tokens=3)
    assert unavailable.value.status_code == 503 and "retry-after" in unavailable.value.response.headers

    wait_until(lambda: server.health()["status"] == "ok", 120, 0.2, "the restarted worker")
    health = server.health()["workers"]["cpu"]
    assert health["restarts"] == 1 and health["pid"] != old_pid
    response = client.completions.create(model=SMOL, prompt="The capital of France is", temperature=0, max_tokens=5)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 5


def test_shutdown_stops_the_workers_no_orphans(tmp_path_factory, prepared_smollm2):
    registry = default_registry()
    registry["server"]["standby_workers"] = "always"
    config = write_registry(tmp_path_factory.mktemp("shutdown"), registry)
    server = start_server(config)
    worker_pid = server.worker_pid()
    standby_pid = wait_until(lambda: server.health()["workers"]["cpu"]["standby_pid"], 120, 0.2, "a standby worker")
    assert pid_alive(worker_pid) and pid_alive(standby_pid)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says how it ended.
    assert stop_server(server) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
    wait_until(lambda: not pid_alive(worker_pid) and not pid_alive(standby_pid), 10, what="the worker and its standby to exit with the controller")


def test_ctrl_c_to_the_process_group_lets_a_running_stream_finish(tmp_path_factory, prepared_smollm2):
    """Regression: Ctrl-C (SIGINT to the whole process group, as a terminal sends it) with a request in
    flight killed the worker with `AssertionError: deactivating an engine that still holds KV blocks`, and
    the stream got an error instead of finishing; idle, the worker printed a KeyboardInterrupt traceback."""
    registry = default_registry()
    registry["server"]["standby_workers"] = "always"
    server = start_server(write_registry(tmp_path_factory.mktemp("ctrl-c"), registry))
    worker_pid = server.worker_pid()
    standby_pid = wait_until(lambda: server.health()["workers"]["cpu"]["standby_pid"], 120, 0.2, "a standby worker")

    async def stream_through_ctrl_c() -> tuple[int, str | None]:
        client = make_client(server)
        stream = await client.completions.create(model=SMOL, prompt="Once upon a time", stream=True, max_tokens=48,
                                                 extra_body={"ignore_eos": True})
        chunks, finish = 0, None
        async for chunk in stream:
            chunks += 1
            finish = chunk.choices[0].finish_reason or finish
            if chunks == 2:
                os.killpg(server.process.pid, signal.SIGINT)  # the server leads its process group, as in a terminal
        return chunks, finish

    try:
        chunks, finish = asyncio.run(stream_through_ctrl_c())
        server.process.wait(60)
    finally:
        stop_server(server)
    assert finish == "length" and chunks >= 48  # drained, not cut
    assert "Traceback" not in server.log() and "KeyboardInterrupt" not in server.log()
    assert "Application shutdown complete" in server.log()
    wait_until(lambda: not pid_alive(worker_pid) and not pid_alive(standby_pid), 10, what="no worker left")


def test_a_worker_stopped_with_requests_in_flight_fails_them_and_exits_cleanly(tmp_path_factory, prepared_smollm2):
    """A worker told to stop by a signal while it runs a request fails that request with an error (it used
    to die on `deactivating an engine that still holds KV blocks`) and is replaced."""
    server = start_server(write_registry(tmp_path_factory.mktemp("worker-sigterm"), default_registry()))
    worker_pid = server.worker_pid()

    async def stream_through_sigterm() -> Exception | None:
        client = make_client(server)
        stream = await client.completions.create(model=SMOL, prompt="Once upon a time", stream=True, **LONG)
        try:
            chunks = 0
            async for _ in stream:
                chunks += 1
                if chunks == 2:
                    os.kill(worker_pid, signal.SIGTERM)
        except openai.APIError as exc:
            return exc
        return None

    try:
        error = asyncio.run(stream_through_sigterm())
        assert error is not None and "shutting down" in str(error)
        wait_until(lambda: not pid_alive(worker_pid), 30, what="the worker to exit")
        assert "still holds KV blocks" not in server.log() and "Traceback" not in server.log()
        wait_until(lambda: server.health()["status"] == "ok", 120, 0.2, "a new worker")
    finally:
        stop_server(server)


def test_the_weight_images_of_a_killed_controller_are_removed_by_the_next_one(tmp_path_factory, prepared_smollm2):
    """Regression: `kill -9` of the controller left its weight images in /dev/shm (525 MiB for the demo), and
    nothing ever removed images of dead controllers."""
    store = tmp_path_factory.mktemp("host-store")
    registry = default_registry()
    registry["memory"] = {**registry.get("memory", {}), "host_store_dir": str(store)}
    config = write_registry(tmp_path_factory.mktemp("orphans"), registry)
    first = start_server(config)
    worker = first.worker_pid()
    left = wait_until(lambda: sorted(store.glob(f"prism-weights-{first.process.pid}-*")), 60, 0.2, "weight images")
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(30)
    wait_until(lambda: not pid_alive(worker), 30, 0.2, "its worker to exit with it")
    assert all(path.exists() for path in left)  # nobody removed them
    second = start_server(config)
    try:
        assert not any(path.exists() for path in left)
        assert f"left by controllers that are gone (pid {first.process.pid})" in second.log()
        assert list(store.glob(f"prism-weights-{second.process.pid}-*"))  # its own images are kept
    finally:
        stop_server(second)
        stop_server(first)
    assert not list(store.glob("prism-weights-*"))
