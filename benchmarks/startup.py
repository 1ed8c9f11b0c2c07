"""Start-up and recovery as an operator sees them: from `prism serve` to serving and to every model
prepared, then from `kill -9` of a worker to every model it held served again, measured from a client.

    python benchmarks/startup.py --config configs/prism-8models.yaml --gpu-memory-utilization 0.915
    python benchmarks/startup.py --config configs/prism-20models.yaml --gpu-memory-utilization 0.915 --no-kill

Writes JSON (command, date, card) to --out: `serve_to_ready_s` (the server answers and its start-up
activations are done), `serve_to_all_staged_s` (every model's module built and image staged and pinned),
`serve_to_all_prepared_s` (every worker reports every model prepared, graphs included; null if some
model's graphs still wait after --graphs-timeout, which `not_prepared` names: a capture ahead borrows the
pool's capture scratch and ~130 MB of KV pages, which a pool full to the last page cannot lend),
`kill9_to_all_served_s` (the last first token of a client per model that was resident, all started right
after the kill, each sending its request again after an error), `kill9_to_worker_ready_s` (the restarted
worker, or its standby, ready), and per model its time to first token after the kill and its failed
attempts (requests that reached the worker as it died fail, as they must). `--no-kill`: start-up only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.controller.server_process import start_server, stop_server, wait_until  # noqa: E402

TOKEN = "startup-bench"


def registry(config: Path, gpu_memory_utilization: float | None) -> dict:
    raw = yaml.safe_load(config.read_text())
    raw.setdefault("server", {})["admin_token_env"] = "PRISM_BENCH_ADMIN_TOKEN"
    if gpu_memory_utilization is not None:
        raw.setdefault("memory", {})["gpu_memory_utilization"] = gpu_memory_utilization
    for model in raw["models"]:  # keep relative paths working from the copy
        for field in ("config", "path", "gguf"):
            if field in model and not Path(model[field]).is_absolute():
                model[field] = str((config.parent / model[field]).resolve())
    return raw


def all_staged(health: dict) -> bool:
    """Every model's module built and host image staged and pinned on every worker (its graphs may wait)."""
    models = health["models"].values()
    return all(model["preparation"] and all(state in ("prepared", "staged, graphs pending") for state in model["preparation"].values())
               for model in models)


def card_name(device: str) -> str:
    """The card's name, from nvidia-smi (this process keeps off the GPU: no context beside the worker's)."""
    if not device.startswith("cuda"):
        return device
    index = device.partition(":")[2] or "0"
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", index]
    return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()


async def worker_back(server, device: str, old_pid: int, since: float, deadline_s: float) -> float:
    """Seconds from `since` until the device's worker is ready again (another process than `old_pid`)."""
    async with httpx.AsyncClient(timeout=30) as client:
        while time.perf_counter() - since < deadline_s:
            worker = (await client.get(server.base_url + "/health")).json()["workers"][device]
            if worker["state"] == "ready" and worker["pid"] != old_pid:
                return time.perf_counter() - since
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the worker of {device} was not back within {deadline_s} s")


async def first_tokens(server, models: list[str], since: float, deadline_s: float) -> tuple[dict[str, float], dict[str, int]]:
    """Per model, a client that sends a streamed request and, as clients do, sends it again after an
    error (a request that reached the worker as it died fails); seconds from `since` to each model's first
    token, and how many attempts failed first."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def attempt(model: str) -> bool:
            body = {"model": model, "prompt": "Hello", "max_tokens": 2, "stream": True, "ignore_eos": True}
            async with client.stream("POST", server.api_url + "/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return False
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        return "choices" in json.loads(line[6:])  # a token; an error event has none
            return False

        async def one(model: str) -> tuple[float, int]:
            failures = 0
            while not await attempt(model):
                failures += 1
                if time.perf_counter() - since > deadline_s:
                    raise RuntimeError(f"{model}: not served within {deadline_s} s of the kill")
                await asyncio.sleep(0.1)
            return time.perf_counter() - since, failures

        outcomes = dict(zip(models, await asyncio.gather(*(one(m) for m in models))))
        return {m: t for m, (t, _) in outcomes.items()}, {m: f for m, (_, f) in outcomes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--no-kill", action="store_true", help="measure start-up only")
    parser.add_argument("--graphs-timeout", type=float, default=60.0,
                        help="after every model is staged, how long to wait for every model's graphs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "startup.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: still stop the server and keep its log

    result = {"benchmark": "startup", "command": " ".join(["python", *sys.argv]),
              "date": datetime.now().astimezone().isoformat(timespec="seconds"), "config": args.config.name}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "registry.yaml"
        path.write_text(yaml.safe_dump(registry(args.config, args.gpu_memory_utilization)))
        launched = time.perf_counter()
        server = start_server(path, env={"PRISM_BENCH_ADMIN_TOKEN": TOKEN}, ready_timeout_s=args.timeout)
        try:
            result["serve_to_ready_s"] = time.perf_counter() - launched
            wait_until(lambda: all_staged(server.health()), args.timeout, 0.2, "every model staged")
            result["serve_to_all_staged_s"] = time.perf_counter() - launched
            try:
                wait_until(lambda: not server.health()["preparing"], args.graphs_timeout, 0.2, "every model prepared")
                result["serve_to_all_prepared_s"] = time.perf_counter() - launched
            except AssertionError:  # graphs of models the full pool cannot lend pages to: captured at activation
                result["serve_to_all_prepared_s"] = None
            health = server.health()
            result["not_prepared"] = {name: model["preparation"] for name, model in health["models"].items()
                                      if any(p != "prepared" for p in model["preparation"].values())}
            result["device"] = next(iter(health["workers"]))
            result["card"] = card_name(result["device"])
            result["num_models"] = len(health["models"])
            resident = [name for name, model in health["models"].items() if model["state"] == "active"]
            result["resident_at_kill"] = resident
            if not args.no_kill:
                old_pid = server.worker_pid(result["device"])
                os.kill(old_pid, signal.SIGKILL)
                killed = time.perf_counter()

                async def recovery():
                    return await asyncio.gather(worker_back(server, result["device"], old_pid, killed, args.timeout),
                                                first_tokens(server, resident, killed, args.timeout))

                result["kill9_to_worker_ready_s"], (ttfts, failures) = asyncio.run(recovery())
                result["kill9_to_all_served_s"] = max(ttfts.values())
                result["kill9_ttft_s"] = ttfts
                result["kill9_failed_attempts"] = failures
                events = httpx.get(server.base_url + "/admin/events", params={"limit": 1000}, headers=headers).json()["events"]
                result["restore_activations"] = [e for e in events if e["kind"] == "activated" and "restore" in (e.get("detail") or "")]
        finally:
            stop_server(server)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".server.log").write_text(server.log())
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_s")}, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
