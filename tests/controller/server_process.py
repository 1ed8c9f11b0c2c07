"""Run the real server (`prism serve`) as a subprocess on a free port, for full-stack tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from controller.registry import default_registry_path

LISTEN_LINE = re.compile(r"prism-serve listening on (http://\S+)")


def default_registry() -> dict:
    """The embedded default registry as data, its models' relative paths made absolute, for a changed copy."""
    registry = yaml.safe_load(default_registry_path().read_text())
    for model in registry["models"]:
        if "config" in model:
            model["config"] = str(default_registry_path().parent / model["config"])
    return registry


def write_registry(directory: Path, registry: dict) -> Path:
    path = directory / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    return path


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def health(self) -> dict:
        return httpx.get(self.base_url + "/health", timeout=10).json()

    def worker_pid(self, worker_id: str = "cpu") -> int:
        return self.health()["workers"][worker_id]["pid"]

    def log(self) -> str:
        return "".join(self.output)


def start_server(config: Path, env: dict | None = None, ready_timeout_s: float = 300) -> ServerProcess:
    """Start `prism serve --config CONFIG --port 0`; return once every model is ready."""
    command = [sys.executable, "-m", "controller.cli", "serve", "--config", str(config), "--port", "0"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    server = ServerProcess(process)
    found = threading.Event()

    def pump() -> None:  # keep reading so the pipe never fills; remember the listening address
        for line in process.stdout:
            server.output.append(line)
            match = LISTEN_LINE.search(line)
            if match and not found.is_set():
                server.base_url = match.group(1)
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(ready_timeout_s) or not server.base_url:
        stop_server(server)
        raise AssertionError(f"server did not start:\n{server.log()}")
    try:
        wait_until(lambda: _healthy(server), ready_timeout_s, 0.2, "all models ready")
    except AssertionError:
        stop_server(server)
        raise AssertionError(f"server never became healthy:\n{server.log()}") from None
    return server


def _healthy(server: ServerProcess) -> bool:
    if server.process.poll() is not None:
        raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()}")
    try:
        return server.health()["status"] == "ok"
    except httpx.HTTPError:
        return False


def stop_server(server: ServerProcess, timeout_s: float = 60) -> int:
    """SIGTERM the server (graceful: drain, stop workers) and wait; return its exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    return server.process.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
