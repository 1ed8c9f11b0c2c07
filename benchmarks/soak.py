"""Soak test: mixed traffic over every model for a long time, with random disconnects; nothing may leak.

    python benchmarks/soak.py [--duration 600] [--clients 8] [--config configs/demo.yaml]
    python benchmarks/soak.py --config configs/soak-swapping.yaml --out benchmarks/results/soak-swapping-cpu.json

Each client loops: a random model, endpoint (chat or completions), streaming or not, output length, and
sometimes a request it abandons mid-stream or one that is invalid on purpose. Pass criteria: zero 5xx,
zero lost requests (every request answered, errored, or deliberately abandoned), controller and worker
resident memory flat (start vs end, after a warm-up), the pool back to idle at the end, and, once the server
has stopped (SIGTERM), none of its weight images left in /dev/shm. With a registry larger than the budget
(configs/soak-swapping.yaml) the models keep swapping: activations and evictions during the soak are
counted (from /metrics). Writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import random
import re
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
LOST: list[dict] = []  # what each lost request was, for the report
STREAM_ERRORS: list[dict] = []  # the error event of each stream that ended in one
sys.path.insert(0, str(ROOT))

from tests.controller.server_process import start_server, stop_server, wait_until  # noqa: E402


async def one_request(client: httpx.AsyncClient, url: str, models: list[str], rng: random.Random, stats: Counter) -> None:
    model = rng.choice(models)
    chat = rng.random() < 0.5
    stream = rng.random() < 0.6
    body: dict = {"model": model, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7, 1.0]), "stream": stream}
    if rng.random() < 0.3:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(["Hi!", "Tell me a joke.", "What is 2+2?", "Name a colour."])}]
    else:
        body["prompt"] = rng.choice(["Once upon a time", "The weather today", "def main():", "1, 2, 3,"])
    kind = rng.random()
    if kind < 0.05:  # invalid on purpose: must be a 4xx
        body["temperature"] = 7
    path = "/v1/chat/completions" if chat else "/v1/completions"
    abandon = stream and kind > 0.88
    stats["sent"] += 1
    try:
        if stream:
            async with client.stream("POST", url + path, json=body) as response:
                stats[f"status_{response.status_code}"] += 1
                if response.status_code != 200:
                    await response.aread()
                    return
                async for line in response.aiter_lines():
                    if abandon and line.startswith("data: "):
                        stats["abandoned"] += 1
                        return
                    if line.startswith("data: ") and '"error"' in line:
                        stats["stream_errors"] += 1
                        STREAM_ERRORS.append({"model": model, "error": line[6:][:300], "at": time.strftime("%H:%M:%S")})
                    if line == "data: [DONE]":
                        stats["completed"] += 1
                        return
                stats["lost"] += 1  # the stream ended without [DONE]
                LOST.append({"model": model, "stream": True, "error": "stream ended without [DONE]", "at": time.strftime("%H:%M:%S")})
        else:
            response = await client.post(url + path, json=body)
            stats[f"status_{response.status_code}"] += 1
            stats["completed" if response.status_code == 200 else "answered_error"] += 1
    except httpx.HTTPError as exc:  # a timeout (no answer in 120 s) or a broken connection: lost
        stats[f"transport_{type(exc).__name__}"] += 1
        stats["lost"] += 1
        LOST.append({"model": model, "chat": chat, "stream": stream, "abandon": abandon, "body": {k: v for k, v in body.items() if k not in ("messages", "prompt")},
                     "error": f"{type(exc).__name__}: {exc}", "at": time.strftime("%H:%M:%S")})


async def run_clients(url: str, models: list[str], clients: int, duration_s: float, seed: int) -> Counter:
    stats: Counter = Counter()
    deadline = time.monotonic() + duration_s

    async def loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < deadline:
                await one_request(client, url, models, rng, stats)

    await asyncio.gather(*(loop(i) for i in range(clients)))
    return stats


def swaps(base_url: str) -> dict[str, float]:
    """Activations and evictions so far, summed over models (Prometheus counters from /metrics)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    totals = {"activations": 0.0, "evictions": 0.0}
    for line in text.splitlines():
        match = re.match(r"prism:model_(activations|evictions)_total\{(.*)\} (\S+)$", line)
        if match and ('outcome="ok"' in match.group(2) or match.group(1) == "evictions"):
            totals[match.group(1)] += float(match.group(3))
    return totals


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak-cpu.json")
    args = parser.parse_args()

    server = start_server(args.config)
    try:
        models = list(server.health()["models"])
        controller_pid, worker_pid = server.process.pid, server.worker_pid()
        warm = asyncio.run(run_clients(server.base_url, models, args.clients, args.warmup, args.seed + 1))
        start_rss = {"controller": rss_mib(controller_pid), "worker": rss_mib(worker_pid)}
        swaps_before = swaps(server.base_url)
        started = time.monotonic()
        stats = asyncio.run(run_clients(server.base_url, models, args.clients, args.duration, args.seed))
        elapsed = time.monotonic() - started

        def idle() -> bool:
            report = server.health()["workers"]["cpu"]
            return not report["pool"]["kv_pages_by_model"] and all(m["num_running"] == 0 for m in report["models"].values())

        wait_until(idle, 60, 0.5, "the pool back to idle")
        end_rss = {"controller": rss_mib(controller_pid), "worker": rss_mib(worker_pid)}
        swaps_after = swaps(server.base_url)
        pool = server.health()["workers"]["cpu"]["pool"]
        same_worker = server.worker_pid() == worker_pid
    finally:
        exit_code = stop_server(server)
    left_in_shm = sorted(glob.glob(f"/dev/shm/prism-weights-{server.process.pid}-*"))
    server_errors = sum(v for k, v in stats.items() if k.startswith("status_5"))
    result = {
        "benchmark": "soak",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": "cpu",
        "duration_s": elapsed,
        "clients": args.clients,
        "requests": dict(stats),
        "warmup_requests": warm["sent"],
        "server_errors_5xx": server_errors + stats["stream_errors"],
        "lost_requests": stats["lost"],
        "rss_mib": {"start": start_rss, "end": end_rss},
        "pool_at_end": {"kv_pages": pool["kv_pages_by_model"], "pages_mapped": pool["pages_mapped"]},
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "models": models,
        "activations_during_soak": swaps_after["activations"] - swaps_before["activations"],
        "evictions_during_soak": swaps_after["evictions"] - swaps_before["evictions"],
        "exit_code_after_sigterm": exit_code,
        "left_in_dev_shm_after_exit": left_in_shm,
        "worker_restarts_during_soak": 0 if same_worker else 1,
        "lost_details": LOST,
        "stream_error_details": STREAM_ERRORS,
        "server_warnings": [line.strip() for line in server.output if " WARNING " in line or " ERROR " in line][-50:],
        "pass": (server_errors + stats["stream_errors"] == 0 and stats["lost"] == 0 and not pool["kv_pages_by_model"] and same_worker
                 and not left_in_shm),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("duration_s", "requests", "server_errors_5xx", "lost_requests", "rss_mib", "pool_at_end",
                                             "activations_during_soak", "evictions_during_soak", "left_in_dev_shm_after_exit", "pass")}, indent=1))


if __name__ == "__main__":
    main()
