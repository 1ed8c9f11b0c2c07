"""Controller overhead: what the OpenAI endpoint adds to a request's latency, and what a streamed token
costs the controller's CPU.

    python benchmarks/controller.py [--config configs/demo.yaml] [--model tiny-llama-random] [--streams 1 16 64]

1. Latency: one request at a time (a fixed prompt of token ids, `--tokens` outputs, greedy, EOS
   ignored), through the endpoint (streaming, the real server: controller, worker process, HTTP) and
   through the same engine and local scheduler in this process (`OfflineRunner`: no controller, no
   HTTP). Medians of `--repeats` runs; the overhead is endpoint minus engine. Prism's paper reports
   +3 ms TTFT and +4 ms TPOT for its controller, LiteLLM's proxy +3.25 ms.
2. Cost: `--streams` concurrent streaming requests of `--tokens` outputs each. The controller and
   worker processes' CPU seconds (psutil) per streamed token, and the tokens per second delivered: a
   controller that needs a whole core for N tokens/s caps what any device behind it can deliver.
   Process CPU time comes in clock ticks (10 ms): measure thousands of tokens, not a handful.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.controller.server_process import start_server, stop_server  # noqa: E402


async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    """(TTFT, TPOT, tokens received) of one streaming completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = last = None
    received = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
                last = time.perf_counter()
                first = first or last
                received += 1
    return first - started, (last - first) / max(1, received - 1), received


def endpoint_latency(url: str, model: str, prompt: list[int], tokens: int, repeats: int) -> dict:
    async def run() -> list[tuple[float, float, int]]:
        async with httpx.AsyncClient() as client:
            await stream_one(client, url, model, prompt, tokens)  # first use: not measured
            return [await stream_one(client, url, model, prompt, tokens) for _ in range(repeats)]

    samples = asyncio.run(run())
    return {"ttft_s": statistics.median(s[0] for s in samples), "tpot_s": statistics.median(s[1] for s in samples)}


def engine_latency(config: Path, model: str, prompt: list[int], tokens: int, repeats: int) -> dict:
    """The same request through the engine and local scheduler in this process (no controller, no HTTP)."""
    from controller.catalog import build_catalog
    from controller.registry import load_registry
    from tests.factories import make_pool
    from workers.contract.messages import SamplingParams
    from workers.offline import OfflineRunner
    from workers.contract.prepare import default_cache_dir

    registry = load_registry(config)
    entry = build_catalog(registry, default_cache_dir())[model]
    runner = OfflineRunner(entry.spec("cpu", registry.memory.block_size), "cpu", make_pool())
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
    try:
        runner.generate([prompt], params)  # first use: not measured
        samples = []
        for _ in range(repeats):
            runner.generate([prompt], params)
            (seq,) = runner.last_sequences
            samples.append((seq.first_token_s - seq.arrival_s, (seq.last_token_s - seq.first_token_s) / max(1, tokens - 1)))
    finally:
        runner.close()
    return {"ttft_s": statistics.median(s[0] for s in samples), "tpot_s": statistics.median(s[1] for s in samples)}


def streaming_cost(server, model: str, prompt: list[int], tokens: int, streams: int) -> dict:
    controller = psutil.Process(server.process.pid)
    worker = psutil.Process(server.worker_pid())

    async def run() -> list[tuple[float, float, int]]:
        limits = httpx.Limits(max_connections=streams + 4)
        async with httpx.AsyncClient(limits=limits) as client:
            return await asyncio.gather(*(stream_one(client, server.base_url, model, prompt, tokens) for _ in range(streams)))

    cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in (("controller", controller), ("worker", worker))}
    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    delivered = sum(r[2] for r in results)
    cpu = {name: sum(p.cpu_times()[:2]) - cpu_before[name] for name, p in (("controller", controller), ("worker", worker))}
    return {
        "streams": streams,
        "tokens": delivered,
        "wall_s": wall,
        "tokens_per_s": delivered / wall,
        "controller_cpu_us_per_token": 1e6 * cpu["controller"] / delivered,
        "worker_cpu_us_per_token": 1e6 * cpu["worker"] / delivered,
        "controller_cpu_share": cpu["controller"] / wall,  # of one core
        "ttft_p50_s": statistics.median(r[0] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--model", default="tiny-llama-random")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--card", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "controller.json")
    args = parser.parse_args()

    prompt = [10 + i % 900 for i in range(args.prompt_len)]
    engine = engine_latency(args.config, args.model, prompt, args.tokens, args.repeats)
    server = start_server(args.config)
    try:
        endpoint = endpoint_latency(server.base_url, args.model, prompt, args.tokens, args.repeats)
        cost = [streaming_cost(server, args.model, prompt, args.tokens, n) for n in args.streams]
    finally:
        stop_server(server)
    result = {
        "benchmark": "controller", "command": " ".join(["python", *sys.argv]), "card": args.card,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"), "model": args.model,
        "prompt_len": args.prompt_len, "tokens": args.tokens,
        "latency": {"endpoint": endpoint, "engine_in_process": engine,
                    "overhead_ttft_ms": 1e3 * (endpoint["ttft_s"] - engine["ttft_s"]),
                    "overhead_tpot_ms": 1e3 * (endpoint["tpot_s"] - engine["tpot_s"])},
        "streaming_cost": cost,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    latency = result["latency"]
    print(f"overhead: TTFT +{latency['overhead_ttft_ms']:.2f} ms, TPOT +{latency['overhead_tpot_ms']:.2f} ms")
    for c in cost:
        print(f"{c['streams']:>4} streams: {c['tokens_per_s']:.0f} tok/s, controller {c['controller_cpu_us_per_token']:.0f} us/token "
              f"({c['controller_cpu_share']:.2f} core), worker {c['worker_cpu_us_per_token']:.0f} us/token")


if __name__ == "__main__":
    main()
