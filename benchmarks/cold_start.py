"""Cold starts as a client sees them: time to first token of a request for a model that is not resident,
measured from the client through the server, against the PCIe floor of its weights.

    python benchmarks/cold_start.py --device cuda:0                      # 1B / 3B / 8B, dummy weights
    python benchmarks/cold_start.py --device cpu --measure configs/tiny-llama.json --burst-config configs/tiny-llama.json \
        --resident-config configs/tiny-llama.json                        # CI-sized, on the CPU

One server, started with a resident model (pinned) and the burst's models. For each measured shape:
  * first activation: the model is added through the admin API (`POST /admin/models`), the benchmark waits
    until every worker says it is prepared, then one streamed request: its time to first token;
  * re-activation: the model is evicted (admin API), then one streamed request again.
Then a burst: the burst's models are evicted, and one request for each is sent at once while a client
keeps sending requests to the resident model; `burst_s` is the time from sending the burst to the last
of its first tokens, and the resident model's times to first token during it are reported with its SLO.
Also reported: the time from `prism serve` to every model prepared, and each activation's parts as the
worker timed them (in-process figures, labelled `worker_*`). Each measuring client first lists the models
(`GET /v1/models`), so that its own first-use costs are not counted as the server's.

The PCIe floor is the weights' bytes over the host-to-device bandwidth from pinned memory, measured in
this process (on the CPU: over a memory copy's bandwidth). Writes JSON (command, date, card) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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

TOKEN = "cold-start-bench"
SHAPES = ROOT / "configs" / "shapes"
PROMPT = "Tell me about the history of the printing press in a few sentences."


def model_entry(name: str, config: Path, seed: int, slo: dict, **extra) -> dict:
    return {"name": name, "load_format": "dummy", "config": str(config.resolve()), "seed": seed, "max_model_len": 2048,
            "max_num_batched_tokens": 512, "slo": slo, **extra}


def registry(args, resident: dict, burst: list[dict]) -> dict:
    memory = {"host_store_bytes": args.host_store}
    if args.device == "cpu":
        memory["cpu_budget_bytes"] = args.cpu_budget
    else:
        memory["gpu_memory_utilization"] = args.gpu_memory_utilization
    return {
        "server": {"admin_token_env": "PRISM_BENCH_ADMIN_TOKEN", "worker_start_timeout_s": 600},
        "devices": [args.device],
        "memory": memory,
        "scheduler": {"idle_evict_s": 1.0},
        "models": [resident, *burst],
    }


class Bench:
    def __init__(self, server):
        self.server = server
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = httpx.request(method, self.server.base_url + "/admin" + path, headers=self.headers, timeout=600, **kwargs)
        response.raise_for_status()
        return response

    def model(self, name: str) -> dict:
        return self.admin("GET", f"/models/{name}").json()

    def prepared(self, name: str) -> bool:
        states = self.model(name)["preparation"]
        failed = [s for s in states.values() if s.startswith("failed")]
        if failed:
            raise RuntimeError(f"preparing {name} failed: {failed[0]}")
        return bool(states) and all(s == "prepared" for s in states.values())

    def evict(self, name: str) -> None:
        self.admin("POST", f"/models/{name}/evict", json={"drain_timeout_s": 0})
        wait_until(lambda: self.model(name)["state"] == "inactive", 60, 0.05, f"{name} evicted")

    async def ttft(self, client: httpx.AsyncClient, model: str) -> float:
        """Seconds from sending a streamed completion to its first token (the whole request is read)."""
        body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0, "ignore_eos": True}
        started = time.perf_counter()
        first = None
        async with client.stream("POST", self.server.api_url + "/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{model}: {response.status_code} {await response.aread()}")
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"] is not None:
                    first = time.perf_counter() - started
        if first is None:
            raise RuntimeError(f"{model}: no token")
        return first


async def measure_one(bench: Bench, name: str) -> tuple[float, float, dict, dict]:
    async with httpx.AsyncClient(timeout=600) as client:
        # The client's own first request pays its first-use costs (anyio's asyncio backend and httpcore's
        # pool, imported and built in this process: 40-45 ms on a 2-core CPU, where the server took 14 ms
        # from the request's arrival to its first token, the same as for the re-activation). A call that
        # touches no model warms the client, not the server.
        (await client.get(bench.server.api_url + "/models")).raise_for_status()
        first = await bench.ttft(client, name)
        first_parts = bench.model(name)["last_activation"]
        bench.evict(name)
        again = await bench.ttft(client, name)
        return first, again, first_parts, bench.model(name)["last_activation"]


async def burst(bench: Bench, names: list[str], resident: str, rate_per_s: float) -> dict:
    """Requests for `names` at once, while `resident` gets a request every 1/rate seconds."""
    async with httpx.AsyncClient(timeout=600) as client:
        await bench.ttft(client, resident)  # warm
        stop = asyncio.Event()
        resident_ttfts: list[float] = []

        async def steady():
            pending = []
            while not stop.is_set():
                pending.append(asyncio.ensure_future(bench.ttft(client, resident)))
                await asyncio.sleep(1 / rate_per_s)
            resident_ttfts.extend(await asyncio.gather(*pending))

        background = asyncio.ensure_future(steady())
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        ttfts = await asyncio.gather(*(bench.ttft(client, n) for n in names))
        burst_s = time.perf_counter() - started
        await asyncio.sleep(0.5)
        stop.set()
        await background
    return {"burst_s": burst_s, "ttft_s": dict(zip(names, ttfts)), "resident_ttft_s": resident_ttfts}


def h2d_bytes_per_s(device: str) -> tuple[float, str]:
    """The host-to-device bandwidth from pinned memory (in this process), or a host memory copy's on the CPU."""
    import torch

    size = 1 << 30 if device != "cpu" else 1 << 28
    source = torch.empty(size, dtype=torch.uint8, pin_memory=device != "cpu")
    target = torch.empty(size, dtype=torch.uint8, device=device)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        target.copy_(source, non_blocking=device != "cpu")
        if device != "cpu":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    what = "pinned host-to-device copy, 1 GiB" if device != "cpu" else "host memory copy, 256 MiB"
    return size / min(times), what


def card_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--measure", type=Path, nargs="+",
                        default=[SHAPES / "llama-3.2-1b.json", SHAPES / "llama-3.2-3b.json", SHAPES / "llama-3.1-8b.json"],
                        help="config.json of each model measured (dummy weights)")
    parser.add_argument("--resident-config", type=Path, default=SHAPES / "llama-3.1-8b.json")
    parser.add_argument("--burst-config", type=Path, nargs="+", default=[SHAPES / "llama-3.2-1b.json", SHAPES / "llama-3.2-3b.json"],
                        help="configs the burst's models cycle through")
    parser.add_argument("--burst", type=int, default=5, help="cold models requested at once")
    parser.add_argument("--resident-rate", type=float, default=10.0, help="requests per second to the resident model during the burst")
    parser.add_argument("--resident-ttft-slo", type=float, default=0.5)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--cpu-budget", default="2GiB")
    parser.add_argument("--host-store", default="96GiB")
    parser.add_argument("--prepare-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "cold_start.json")
    args = parser.parse_args()

    slo = {"ttft_s": args.resident_ttft_slo, "tpot_s": 0.1}
    resident = model_entry("resident", args.resident_config, 100, slo, pinned=True)
    burst_models = [model_entry(f"burst-{i}", args.burst_config[i % len(args.burst_config)], 200 + i, slo) for i in range(args.burst)]
    measured = [model_entry(f"cold-{i}-{path.stem}", path, 300 + i, slo) for i, path in enumerate(args.measure)]
    bandwidth, bandwidth_what = h2d_bytes_per_s(args.device)
    result = {"benchmark": "cold_start", "command": " ".join(["python", *sys.argv]),
              "date": datetime.now().astimezone().isoformat(timespec="seconds"), "card": card_name(args.device),
              "pcie_bytes_per_s": bandwidth, "pcie_measured_as": bandwidth_what, "models": []}
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "registry.yaml"
        path.write_text(yaml.safe_dump(registry(args, resident, burst_models)))
        launched = time.perf_counter()
        server = start_server(path, env={"PRISM_BENCH_ADMIN_TOKEN": TOKEN}, ready_timeout_s=args.prepare_timeout)
        bench = Bench(server)
        try:
            everyone = [resident["name"], *(m["name"] for m in burst_models)]
            wait_until(lambda: all(bench.prepared(n) for n in everyone), args.prepare_timeout, 0.2, "every model prepared")
            result["serve_to_all_prepared_s"] = time.perf_counter() - launched
            result["num_models_at_start"] = len(everyone)
            for entry in measured:
                bench.admin("POST", "/models", json=entry)
                asked = time.perf_counter()
                wait_until(lambda: bench.prepared(entry["name"]), args.prepare_timeout, 0.05, f"{entry['name']} prepared")
                prepare_s = time.perf_counter() - asked
                first, again, first_parts, again_parts = asyncio.run(measure_one(bench, entry["name"]))
                weight_bytes = bench.model(entry["name"])["memory"]["weight_bytes"]
                row = {"model": entry["name"], "weight_bytes": weight_bytes, "first_activation_ttft_s": first,
                       "reactivation_ttft_s": again, "pcie_floor_s": weight_bytes / bandwidth, "prepare_s": prepare_s,
                       "worker_first_activation": first_parts, "worker_reactivation": again_parts}
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not k.startswith("worker")}), flush=True)
                result["models"].append(row)
                bench.evict(entry["name"])
                bench.admin("DELETE", f"/models/{entry['name']}")
            names = [m["name"] for m in burst_models]
            for name in names:
                if bench.model(name)["state"] == "active":
                    bench.evict(name)
            outcome = asyncio.run(burst(bench, names, resident["name"], args.resident_rate))
            resident_ttfts = outcome["resident_ttft_s"]
            result["burst_s"] = outcome["burst_s"]
            result["burst"] = {"models": names, "ttft_s": outcome["ttft_s"],
                               "resident_ttft_s": {"p50": statistics.median(resident_ttfts), "max": max(resident_ttfts),
                                                   "count": len(resident_ttfts), "slo_s": args.resident_ttft_slo,
                                                   "met": sum(t <= args.resident_ttft_slo for t in resident_ttfts) / len(resident_ttfts)},
                               "worker_activations": {n: bench.model(n)["last_activation"] for n in names}}
            print(json.dumps({"burst_s": round(result["burst_s"], 4), "resident": result["burst"]["resident_ttft_s"]}), flush=True)
        finally:
            stop_server(server)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".server.log").write_text(server.log())
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
