"""Overcommit: a registry whose weights exceed the pool, replayed against prism, swap and static.

    python benchmarks/overcommit.py --config configs/prism-20models.yaml --gpu-memory-utilization 0.6 \
        --alpha 1.0 --rate-scales 0.25 0.5 1 2 4 --duration 300 --out benchmarks/results/overcommit-h100.json
    python benchmarks/overcommit.py --config configs/soak-swapping.yaml --rate-scales 0.1 0.2 \
        --duration 60 --calibrate 50 --out benchmarks/out/overcommit-cpu.json                       # CPU

What is replayed (the options of `benchmarks/replay.py`): Arena streams mapped to the models (`--streams`)
or any trace with models drawn by a popularity law (`--alpha`), and with `--on-off ON OFF` an on/off burst
pattern on top: model i only sends during the ON seconds of each ON+OFF period (trace time), periods
shifted by model so that the bursts move across the registry. Every policy replays the same requests:
the same trace window per rate scale (duration x scale of trace time), the same prompts (seeded).

Honest statistics (issue 21):
  * SLOs: each model's TTFT and TPOT SLO is its P95 alone on the device (`--calibrate` requests, at least
    50) x `--slo-scale`;
  * a point's TTFT attainment, TPOT attainment and goodput (both met); its requests lost (answered 200
    but never finished, or never answered: must be 0) apart from its errors (an HTTP status or an error
    event, counted as missed);
  * activations and evictions per minute and the seconds spent activating, from the server's metrics;
  * the strict ceiling of a policy: the highest rate scale such that it and every lower scale of the
    run held 99% TTFT and 90% TPOT attainment (a point that holds above one that failed does not count).

Policies, as operators run them: `prism` (the registry's scheduler), `static` (separate instances: the
models that fit are placed once with fixed KV shares, the rest get a 503 at once), `swap` (Ollama's
defaults: up to 3 models per device, least recently used out, unloaded after 5 idle minutes).
Writes JSON (command, date, card; `ceilings`, `weights_over_pool`, `lost_requests`) and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.replay import (  # noqa: E402
    ADMIN_TOKEN,
    CLIENT_GC,
    TraceRequest,
    _card,
    add_trace_arguments,
    calibrate,
    plot,
    policy_registry,
    run_points,
    start_policy_server,
    trace_jobs,
)

POLICIES = ("prism", "static", "swap")
SWAP_AS_OLLAMA = {"max_models_per_device": 3, "swap_keep_alive_s": 300.0}  # OLLAMA_MAX_LOADED_MODELS, OLLAMA_KEEP_ALIVE
TTFT_TARGET, TPOT_TARGET = 0.99, 0.90
MIN_CALIBRATION = 50
LIFECYCLE_TOTALS = {"prism:model_activations_total{": "activations", "prism:model_evictions_total{": "evictions",
                    "prism:model_activation_seconds_sum{": "activating_s"}


def on_off(jobs: list[tuple[TraceRequest, str]], models: list[str], on_s: float, off_s: float) -> list[tuple[TraceRequest, str]]:
    """Keep model i's requests that fall in the ON part of its periods (trace time); periods start
    i x period / len(models) apart."""
    period = on_s + off_s
    shift = {m: i * period / len(models) for i, m in enumerate(models)}
    return [(r, m) for r, m in jobs if (r.time_s + shift[m]) % period < on_s]


def strict_ceiling(points: list[dict]) -> float | None:
    """The highest rate scale held, with every lower one of the run held too (None: the lowest failed)."""
    ceiling = None
    for point in sorted(points, key=lambda p: p["rate_scale"]):
        overall = point["overall"]
        if overall["ttft_attainment"] < TTFT_TARGET or overall["tpot_attainment"] < TPOT_TARGET or overall["lost"]:
            break
        ceiling = point["rate_scale"]
    return ceiling


def lifecycle_totals(base_url: str) -> dict[str, float]:
    """Activations (completed), evictions and seconds spent activating so far, all models, from /metrics
    (the admin event log keeps only the last 1,000 events)."""
    totals = dict.fromkeys(LIFECYCLE_TOTALS.values(), 0.0)
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        for prefix, key in LIFECYCLE_TOTALS.items():
            if line.startswith(prefix) and (key != "activations" or 'outcome="ok"' in line):
                totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


def weights_over_pool(base_url: str) -> float:
    """The registry's weights against the pools of all devices, as the server reports them."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    models = httpx.get(base_url + "/admin/models", headers=headers, timeout=30).json()["models"]
    pools = [w["pool"]["budget_bytes"] for w in httpx.get(base_url + "/health", timeout=30).json()["workers"].values()]
    return sum(m["memory"]["weight_bytes"] for m in models) / sum(pools)


def add_lifecycle_rates(point: dict, before: dict[str, float], after: dict[str, float]) -> None:
    """A point's activations and evictions per minute, and its seconds spent activating."""
    minutes = point["wall_s"] / 60
    point["activations_per_minute"] = round((after["activations"] - before["activations"]) / minutes, 2)
    point["evictions_per_minute"] = round((after["evictions"] - before["evictions"]) / minutes, 2)
    point["activating_s"] = round(after["activating_s"] - before["activating_s"], 3)


def run_policy(policy: str, args: argparse.Namespace, jobs, slos: dict, result: dict) -> list[dict]:
    from tests.controller.server_process import stop_server

    registry = policy_registry(args.config, policy, slos, args.slo_scale, args.gpu_memory_utilization)
    if policy == "swap":
        registry["scheduler"].update(SWAP_AS_OLLAMA)
    server = start_policy_server(registry, policy, args.out.parent)
    try:
        result.setdefault("weights_over_pool", round(weights_over_pool(server.base_url), 3))
        points = []
        for scale in args.rate_scales:  # one point at a time, to read the lifecycle counters around each
            before = lifecycle_totals(server.base_url)
            points += run_points(server.base_url, jobs, args.models, _one_scale(args, scale), slos, server_pid=server.process.pid)
            add_lifecycle_rates(points[-1], before, lifecycle_totals(server.base_url))
        return points
    finally:
        stop_server(server)
        (args.out.parent / f"server-{policy}.log").write_text(server.log())


def _one_scale(args: argparse.Namespace, scale: float) -> argparse.Namespace:
    one = argparse.Namespace(**vars(args))
    one.rate_scales = [scale]
    one.warmup = args.warmup if scale == args.rate_scales[0] else 0.0
    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="an overcommitted registry")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--gpu-memory-utilization", type=float, help="override the registry's share of each GPU")
    add_trace_arguments(parser, duration_s=120.0, max_output=256)
    parser.add_argument("--on-off", type=float, nargs=2, metavar=("ON_S", "OFF_S"), help="on/off bursts per model (trace time)")
    parser.add_argument("--calibrate", type=int, default=MIN_CALIBRATION, help=f"requests per model for its SLO (at least {MIN_CALIBRATION})")
    parser.add_argument("--slos", type=Path, help="JSON of dedicated P95s measured before (instead of calibrating)")
    parser.add_argument("--warmup", type=float, default=0.0, help="wall seconds replayed before the first point, not measured")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "overcommit.json")
    args = parser.parse_args()
    if args.slos is None and args.calibrate < MIN_CALIBRATION:
        parser.error(f"--calibrate must be at least {MIN_CALIBRATION}: a P95 of fewer samples is its maximum")
    CLIENT_GC.install()

    import yaml

    args.models = [m["name"] for m in yaml.safe_load(args.config.read_text())["models"]]
    jobs = trace_jobs(args, args.models)
    if args.on_off:
        jobs = on_off(jobs, args.models, *args.on_off)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "overcommit", "command": " ".join(["python", *sys.argv]),
              "date": datetime.now().astimezone().isoformat(timespec="seconds"), "card": _card(), "config": str(args.config),
              "trace": args.trace.name, "streams": args.streams, "alpha": None if args.streams else args.alpha, "on_off": args.on_off,
              "rate_scales": args.rate_scales, "duration_s": args.duration, "slo_scale": args.slo_scale,
              "targets": {"ttft_attainment": TTFT_TARGET, "tpot_attainment": TPOT_TARGET}, "policies": {}}
    slos = json.loads(args.slos.read_text()) if args.slos else measure_slos(args, jobs)
    result["dedicated_p95"] = slos
    for policy in args.policies:
        print(f"policy {policy}: starting the server", flush=True)
        result["policies"][policy] = run_policy(policy, args, jobs, slos, result)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # keep what is done if a later policy fails
    result["ceilings"] = {policy: strict_ceiling(points) for policy, points in result["policies"].items()}
    result["lost_requests"] = sum(p["overall"]["lost"] for points in result["policies"].values() for p in points)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out)
    print(json.dumps({k: result[k] for k in ("ceilings", "weights_over_pool", "lost_requests")}))


def measure_slos(args: argparse.Namespace, jobs) -> dict:
    """Each model alone (one request at a time, nothing else running) on a prism server."""
    from tests.controller.server_process import stop_server

    server = start_policy_server(policy_registry(args.config, "prism", None, args.slo_scale, args.gpu_memory_utilization),
                                 "calibration", args.out.parent)
    try:
        return asyncio.run(calibrate(server.base_url, args.models, jobs, args.calibrate, args.timeout))
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
