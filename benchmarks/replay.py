"""Replay a multi-model request trace against an OpenAI endpoint and measure SLO attainment per model.

    python benchmarks/replay.py --url http://127.0.0.1:8000 --trace ../shared/traces/arena_multimodel.csv \
        --models m1 m2 ... --streams 2 14 3 10 5 19 23 24 --rate-scales 1 2 4 --duration 60 --out r.json
    python benchmarks/replay.py --config configs/prism-8models.yaml --policies prism static swap ...

Traces: the Arena multi-model CSV (`req_time_s,adapter_rank,...,prompt_len,output_len`; `--streams` picks
the streams that become the models, in order) or the Azure LLM CSV (`TIMESTAMP,ContextTokens,
GeneratedTokens`; requests are spread over the models by a popularity law, rate of model i proportional
to (i+1)^-alpha, as MuxServe). A rate scale s replays the trace s times faster; `--duration` bounds the
wall time of each point (the trace window replayed is duration x s). Prompts are random token ids of
the trace's lengths; outputs run exactly the trace's lengths (ignore_eos).

SLOs: per model, TTFT and TPOT SLO = its P95 on a dedicated device x `--slo-scale`. The dedicated P95 is
measured first (`--calibrate`, each model alone, sequential requests) or read from `--slos FILE`.
With `--config`, the server is started once per policy (the registry's scheduler.policy overridden)
and every rate scale is replayed on it. Output: JSON (per model and overall: TTFT / TPOT / both
attainment, goodput, percentiles; the highest rate scale holding 99% TTFT attainment per policy) and,
with matplotlib installed, a plot next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.local_policy import TPOT_TARGETS  # noqa: E402
from workers.contract.gc_heap import GcPauses, freeze_heap  # noqa: E402
from workers.contract.messages import GC_PAUSE_BUCKETS_S, GcStats  # noqa: E402

CLIENT_GC = GcPauses()  # the replaying process's own collections: installed by main(), recorded per point


@dataclass(frozen=True)
class TraceRequest:
    time_s: float
    stream: int
    prompt_len: int
    output_len: int


@dataclass
class Result:
    model: str
    sent_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None
    num_tokens: int = 0
    error: str | None = None
    lost: bool = False  # answered 200 but its stream ended without [DONE] and without an error: lost silently


# --- traces ------------------------------------------------------------------------------------------


def load_trace(path: Path) -> list[TraceRequest]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: empty trace")
    if "req_time_s" in rows[0]:
        return sorted(
            (TraceRequest(float(r["req_time_s"]), int(r["adapter_rank"]), int(r["prompt_len"]), int(r["output_len"])) for r in rows),
            key=lambda r: r.time_s,
        )
    if "TIMESTAMP" in rows[0]:
        start = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
        return [
            TraceRequest((datetime.fromisoformat(r["TIMESTAMP"][:26]) - start).total_seconds(), -1, int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for r in rows
        ]
    raise ValueError(f"{path}: unknown trace format (columns {list(rows[0])})")


def assign_models(trace: list[TraceRequest], models: list[str], streams: list[int] | None, alpha: float, seed: int) -> list[tuple[TraceRequest, str]]:
    """Arena: stream streams[i] -> models[i] (others dropped). Azure: model i drawn with weight (i+1)^-alpha."""
    if streams:
        if len(streams) != len(models):
            raise ValueError("--streams and --models must have the same length")
        by_stream = dict(zip(streams, models))
        return [(r, by_stream[r.stream]) for r in trace if r.stream in by_stream]
    rng = random.Random(seed)
    weights = [(i + 1) ** -alpha for i in range(len(models))]
    return [(r, rng.choices(models, weights)[0]) for r in trace]


def add_trace_arguments(parser: argparse.ArgumentParser, duration_s: float, max_output: int) -> None:
    """The options that say what is replayed: trace, streams or popularity law, rate scales, SLO scale."""
    parser.add_argument("--trace", type=Path, default=ROOT.parent / "shared" / "traces" / "arena_multimodel.csv")
    parser.add_argument("--streams", type=int, nargs="*", default=None, help="Arena streams mapped to the models in order")
    parser.add_argument("--alpha", type=float, default=1.0, help="popularity exponent for traces without streams")
    parser.add_argument("--rate-scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--duration", type=float, default=duration_s, help="seconds replayed per rate scale")
    parser.add_argument("--slo-scale", type=float, default=5.0)
    parser.add_argument("--max-output", type=int, default=max_output, help="cap on a request's output tokens")
    parser.add_argument("--seed", type=int, default=0)


def trace_jobs(args: argparse.Namespace, models: list[str]) -> list[tuple[TraceRequest, str]]:
    """The trace of `add_trace_arguments`' options, outputs capped, as (request, model) pairs."""
    trace = [TraceRequest(r.time_s, r.stream, r.prompt_len, min(r.output_len, args.max_output)) for r in load_trace(args.trace)]
    return assign_models(trace, models, args.streams, args.alpha, args.seed)


# --- one request -------------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, model: str, request: TraceRequest, rng: random.Random, timeout_s: float) -> Result:
    prompt = [rng.randrange(10, 1000) for _ in range(max(1, request.prompt_len))]
    body = {"model": model, "prompt": prompt, "max_tokens": max(1, request.output_len), "min_tokens": max(1, request.output_len),
            "ignore_eos": True, "temperature": 0, "stream": True}
    result = Result(model, time.perf_counter())
    first = last = None
    streaming = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            streaming, done = True, False
            async for line in sse_lines(response):
                done = done or line == b"data: [DONE]"
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    result.num_tokens += 1
    except (httpx.HTTPError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: a chunk that is not JSON
        result.error = f"{type(exc).__name__}: {exc}"
        # Lost: a stream the server dropped, or a request it never answered within the client's timeout.
        result.lost = streaming or isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError))
        return result
    if not done:
        result.error, result.lost = "the stream ended without [DONE] and without an error", True
        return result
    if first is not None:
        result.ttft_s = first - result.sent_s
        if result.num_tokens > 1:
            result.tpot_s = (last - first) / (result.num_tokens - 1)
    return result


async def sse_lines(response: httpx.Response):
    """The lines of a server-sent event stream, split where SSE splits them (LF; CR LF). Not httpx's
    `aiter_lines`: it also splits at U+2028, U+0085 and the like, which JSON strings may hold raw
    (random token ids decode to them), and cuts a chunk in two."""
    pending = b""
    async for data in response.aiter_bytes():
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
    if pending:
        yield pending


# --- a replay ----------------------------------------------------------------------------------------


async def replay(url: str, window: list[tuple[TraceRequest, str]], rate_scale: float, timeout_s: float, seed: int,
                 start_at: float | None = None) -> list[Result]:
    """Send `window`'s requests at their trace times / `rate_scale`, counted from `start_at` (a
    `time.perf_counter()` instant, system-wide on Linux; default now); return when all are done."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        started = time.perf_counter() if start_at is None else start_at
        tasks = []
        for request, model in window:
            delay = request.time_s / rate_scale - (time.perf_counter() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, url, model, request, rng, timeout_s)))
        return await asyncio.gather(*tasks)


@dataclass
class ClientRun:
    """A point's requests as the client saw them, and what the client itself spent on them."""

    results: list[Result]
    cpu_s: float  # CPU seconds of the replaying processes
    gc_delta: GcStats  # their garbage collections over the point


def replay_point(url: str, jobs: list[tuple[TraceRequest, str]], rate_scale: float, duration_s: float, timeout_s: float,
                 seed: int, processes: int = 1) -> ClientRun:
    """Replay the trace window of one point from `processes` client processes (requests dealt round-robin,
    one clock for all), so that timestamping thousands of streamed tokens a second never waits for one
    event loop: at rate scale 32 one process was ~0.8 of a core busy."""
    window = [(r, m) for r, m in jobs if r.time_s <= duration_s * rate_scale]
    if processes <= 1:
        return _replay_share(url, window, rate_scale, timeout_s, seed, None)
    import concurrent.futures
    import multiprocessing

    start_at = time.perf_counter() + 0.5  # time for the processes to fork and start their loops
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        runs = list(pool.map(_replay_share, *zip(*[(url, window[i::processes], rate_scale, timeout_s, seed + 1000 * i, start_at)
                                                     for i in range(processes)])))
    return ClientRun([r for run in runs for r in run.results], sum(run.cpu_s for run in runs), _sum_gc([run.gc_delta for run in runs]))


def _replay_share(url: str, window, rate_scale: float, timeout_s: float, seed: int, start_at: float | None) -> ClientRun:
    freeze_heap()  # this process's own full collections would delay the tokens it timestamps
    gc_before, cpu_before = CLIENT_GC.stats(), time.process_time()
    results = asyncio.run(replay(url, window, rate_scale, timeout_s, seed, start_at))
    return ClientRun(results, time.process_time() - cpu_before, _sum_gc([CLIENT_GC.stats()], minus=gc_before))


def _sum_gc(stats: list[GcStats], minus: GcStats | None = None) -> GcStats:
    """The collections of several processes together, less `minus` (the same process's earlier stats)."""
    shape = [len(counts) for counts in stats[0].pause_counts]
    counts = [[sum(s.pause_counts[g][b] for s in stats) - (minus.pause_counts[g][b] if minus else 0) for b in range(n)]
              for g, n in enumerate(shape)]
    pause_s = [sum(s.pause_s[g] for s in stats) - (minus.pause_s[g] if minus else 0.0) for g in range(len(shape))]
    return GcStats(counts, pause_s, max(s.frozen_objects for s in stats))


def _no_gc(like: GcStats) -> GcStats:
    return GcStats([[0] * len(counts) for counts in like.pause_counts], [0.0] * len(like.pause_s), like.frozen_objects)


async def calibrate(url: str, models: list[str], jobs: list[tuple[TraceRequest, str]], num: int, timeout_s: float) -> dict[str, dict]:
    """Dedicated P95 TTFT / TPOT of each model: its own trace requests, one at a time, nothing else running."""
    slos = {}
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for model in models:
            own = [r for r, m in jobs if m == model] or [TraceRequest(0, 0, 128, 64)]
            mine = (own * -(-num // len(own)))[:num]  # its trace's requests, again from the start if it has fewer
            for length in (16, 37, 100, 300):  # activation, and kernels compiled for several prompt shapes
                await send(client, url, model, TraceRequest(0, 0, length, 4), rng, timeout_s)
            results = [await send(client, url, model, TraceRequest(0, 0, r.prompt_len, min(r.output_len, 128)), rng, timeout_s) for r in mine]
            measured = [(m, r) for m, r in zip(mine, results) if r.error is None and r.ttft_s is not None]
            if not measured:
                raise RuntimeError(f"calibration of {model} failed: {results[0].error}")
            slos[model] = {
                "ttft_p95_s": p95([r.ttft_s for _, r in measured]), "tpot_p95_s": p95([r.tpot_s for _, r in measured if r.tpot_s]),
                "samples": [{"prompt_len": m.prompt_len, "ttft_s": r.ttft_s} for m, r in measured],
            }
    return slos


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))] if values else float("nan")


def summarize(results: list[Result], slos: dict[str, dict], slo_scale: float, wall_s: float) -> dict:
    per_model = {}
    for model in sorted({r.model for r in results}):
        mine = [r for r in results if r.model == model]
        ttft_slo = slos[model]["ttft_p95_s"] * slo_scale
        tpot_slo = slos[model]["tpot_p95_s"] * slo_scale
        ttft_ok = [r.error is None and r.ttft_s is not None and r.ttft_s <= ttft_slo for r in mine]
        tpot_ok = [r.error is None and (r.tpot_s is None or r.tpot_s <= tpot_slo) for r in mine]
        per_model[model] = {
            "requests": len(mine),
            "errors": sum(r.error is not None for r in mine),
            "lost": sum(r.lost for r in mine),
            "error_messages": sorted({r.error for r in mine if r.error is not None})[:5],
            "ttft_slo_s": ttft_slo,
            "tpot_slo_s": tpot_slo,
            "ttft_attainment": sum(ttft_ok) / len(mine),
            "tpot_attainment": sum(tpot_ok) / len(mine),
            "attainment": sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / len(mine),
            "ttft_p50_s": _pct([r.ttft_s for r in mine if r.ttft_s is not None], 0.5),
            "ttft_p99_s": _pct([r.ttft_s for r in mine if r.ttft_s is not None], 0.99),
            "tpot_p50_s": _pct([r.tpot_s for r in mine if r.tpot_s is not None], 0.5),
            "goodput_rps": sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / wall_s,
        }
    total = sum(m["requests"] for m in per_model.values()) or 1
    overall = {
        key: sum(m[key] * m["requests"] for m in per_model.values()) / total
        for key in ("ttft_attainment", "tpot_attainment", "attainment")
    }
    overall["requests"] = total
    # A point's attainment is a proportion of a few hundred requests: near 99% one late request moves it
    # by 0.2-0.5%, so say how sure it is before reading a threshold off it.
    overall["ttft_attainment_ci95"] = wilson_interval(round(overall["ttft_attainment"] * total), total)
    overall["errors"] = sum(m["errors"] for m in per_model.values())
    overall["lost"] = sum(m["lost"] for m in per_model.values())
    overall["goodput_rps"] = sum(m["goodput_rps"] for m in per_model.values())
    return {"per_model": per_model, "overall": overall}


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal approximation)."""
    if trials == 0:
        return [0.0, 1.0]
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * (p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5 / (1 + z * z / trials)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


# --- driving servers ---------------------------------------------------------------------------------


def policy_registry(config: Path, policy: str, slos: dict | None, slo_scale: float, gpu_memory_utilization: float | None = None,
                    overlap_steps: bool = True, tpot_target: str | None = None) -> dict:
    """The registry `config` with `policy`, the measured SLOs written in (so the scheduler knows them) and,
    when given, another share of the GPU for the pool (to replay a smaller card's memory on a larger one)."""
    import yaml

    registry = yaml.safe_load(config.read_text())
    registry.setdefault("scheduler", {})["policy"] = policy
    registry["scheduler"]["overlap_steps"] = overlap_steps
    if tpot_target is not None:
        registry["scheduler"]["tpot_target"] = tpot_target
    registry.setdefault("server", {})["admin_token_env"] = "PRISM_REPLAY_ADMIN_TOKEN"
    if gpu_memory_utilization is not None:
        registry.setdefault("memory", {})["gpu_memory_utilization"] = gpu_memory_utilization
    for model in registry["models"]:
        if slos and model["name"] in slos:
            p95 = slos[model["name"]]
            model["slo"] = {"ttft_s": p95["ttft_p95_s"] * slo_scale, "tpot_s": p95["tpot_p95_s"] * slo_scale}
    for model in registry["models"]:  # keep relative paths working from the copy
        for key in ("path", "gguf", "config", "tokenizer"):
            if key in model and not Path(str(model[key])).is_absolute() and (config.parent / str(model[key])).exists():
                model[key] = str((config.parent / str(model[key])).resolve())
    return registry


def start_policy_server(registry: dict, policy: str, workdir: Path):
    import yaml

    from tests.controller.server_process import start_server

    path = workdir / f"registry-{policy}.yaml"
    path.write_text(yaml.safe_dump(registry))
    return start_server(path, env={"PRISM_REPLAY_ADMIN_TOKEN": ADMIN_TOKEN}, ready_timeout_s=900)


ADMIN_TOKEN = "replay-admin"


def lifecycle_counts(base_url: str) -> dict:
    """Activations and evictions so far, from the admin event log."""
    events = httpx.get(base_url + "/admin/events", params={"limit": 1000}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    counts: dict[str, int] = {}
    for event in events.json().get("events", []):
        counts[event["kind"]] = counts.get(event["kind"], 0) + 1
    return counts


STEP_COUNTERS = {  # /metrics counter -> its name in a point's "steps" (per model)
    "prism:model_steps": "steps",
    "prism:model_scheduled_tokens": "tokens",
    "prism:model_step_device_seconds": "device_s",
    "prism:num_preemptions": "preemptions",
}
SCHEDULER_GAUGES = {"prism:prefill_speed_estimate_tokens_per_second": "prefill_speed_estimate"}  # read at the end


def worker_counters(text: str) -> dict[tuple[str, str], float]:
    """The workers' step counters so far and the schedulers' gauges now (`/metrics` text, as of the workers'
    last heartbeat): (name, device or model) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (family.name, sample.labels.get("device") or sample.labels["model_name"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name in ("prism:device_busy_seconds", *STEP_COUNTERS, *SCHEDULER_GAUGES)
        for sample in family.samples if sample.name.endswith("_total") or family.name in SCHEDULER_GAUGES
    }


QUEUE_GAUGES = {"prism:num_requests_running": "running", "prism:num_requests_waiting": "waiting"}  # per model


class StateSampler:
    """Samples the workers' queues and the pools' pages from `/metrics` in a thread while a point runs
    (the workers report them in their heartbeats, 1 s apart), to say what stopped admission when the TTFT
    falls: the pool (few free pages), the sequence cap (running at `max_num_seqs`), or neither."""

    def __init__(self, url: str, interval_s: float = 0.5):
        import threading

        self.url, self.interval_s = url, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StateSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(self.interval_s):
                try:
                    text = client.get(self.url + "/metrics").text
                except httpx.HTTPError:
                    continue
                self.samples.append({"t_s": round(time.perf_counter() - self._started, 2), **state_gauges(text)})

    def summary(self) -> dict:
        """Per model the most requests running and waiting at once; per device the fewest free pages."""
        models: dict[str, dict] = {}
        devices: dict[str, dict] = {}
        for sample in self.samples:
            for (kind, model), value in sample["queues"].items():
                entry = models.setdefault(model, {"max_running": 0, "max_waiting": 0})
                entry[f"max_{kind}"] = max(entry[f"max_{kind}"], int(value))
            for device, pages in sample["pages"].items():
                entry = devices.setdefault(device, {"min_free_pages": pages["free"], "max_kv_pages": pages["kv"]})
                entry["min_free_pages"] = min(entry["min_free_pages"], pages["free"])
                entry["max_kv_pages"] = max(entry["max_kv_pages"], pages["kv"])
        series = [{"t_s": s["t_s"], "free_pages": {d: p["free"] for d, p in s["pages"].items()},
                   "running": int(sum(v for (k, _), v in s["queues"].items() if k == "running")),
                   "waiting": int(sum(v for (k, _), v in s["queues"].items() if k == "waiting"))} for s in self.samples]
        return {"interval_s": self.interval_s, "models": dict(sorted(models.items())), "devices": devices, "series": series}


def state_gauges(text: str) -> dict:
    """From `/metrics` text: queues {(running | waiting, model): requests} and pages {device: {kind: pages}}."""
    from prometheus_client.parser import text_string_to_metric_families

    queues: dict[tuple[str, str], float] = {}
    pages: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in QUEUE_GAUGES:
            for sample in family.samples:
                queues[(QUEUE_GAUGES[family.name], sample.labels["model_name"])] = sample.value
        elif family.name == "prism:pool_pages":
            for sample in family.samples:
                pages.setdefault(sample.labels["device"], {})[sample.labels["kind"]] = int(sample.value)
    return {"queues": queues, "pages": pages}


def slo_counts(text: str) -> dict[tuple[str, str], float]:
    """The controller's TTFT SLO counters so far (`/metrics` text): (model, "met" | "missed") -> requests."""
    from prometheus_client.parser import text_string_to_metric_families

    kinds = {"prism:slo_met": "met", "prism:slo_missed": "missed"}
    return {
        (sample.labels["model_name"], kinds[family.name]): sample.value
        for family in text_string_to_metric_families(text) if family.name in kinds
        for sample in family.samples if sample.name.endswith("_total") and sample.labels.get("slo") == "ttft"
    }


def server_ttft_attainment(before: dict, after: dict) -> dict[str, float]:
    """TTFT attainment as the controller counted it over a point (arrival at the controller to the first
    token's arrival there, against the registry's SLO), per model and "overall": the gap to the client's
    numbers is what delivery (controller to client, the client's own loop) adds."""
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}
    models = sorted({model for model, _ in delta})
    totals = {m: (delta.get((m, "met"), 0.0), delta.get((m, "missed"), 0.0)) for m in models}
    shares = {m: round(met / (met + missed), 4) for m, (met, missed) in totals.items() if met + missed}
    met, missed = sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())
    if met + missed:
        shares["overall"] = round(met / (met + missed), 4)
    return shares


def gc_stats(text: str) -> dict[str, GcStats]:
    """Every server process's garbage collection pauses so far, from the `prism:gc_pause_seconds` histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    bounds = [*GC_PAUSE_BUCKETS_S, float("inf")]
    cumulative: dict[str, list[list[float]]] = {}
    sums: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "prism:gc_pause_seconds":
            continue
        for sample in family.samples:
            process, generation = sample.labels["process"], int(sample.labels["generation"])
            cumulative.setdefault(process, [[0.0] * len(bounds) for _ in range(3)])
            sums.setdefault(process, [0.0, 0.0, 0.0])
            if sample.name.endswith("_bucket"):
                cumulative[process][generation][bounds.index(float(sample.labels["le"]))] = sample.value
            elif sample.name.endswith("_sum"):
                sums[process][generation] = sample.value
    return {
        process: GcStats([[int(c - p) for c, p in zip(counts, [0.0, *counts[:-1]])] for counts in per_gen], sums[process], 0)
        for process, per_gen in cumulative.items()
    }


def gc_summary(before: dict[str, GcStats], after: dict[str, GcStats]) -> dict[str, dict]:
    """Per process, the collections of one point: how many (full ones apart), their pause in all, how many
    paused over 10 ms, and the bucket bound under which the longest pause fell."""
    bounds = [*GC_PAUSE_BUCKETS_S, float("inf")]
    over_10ms = bounds.index(0.01) + 1
    summary = {}
    for process, stats in sorted(after.items()):
        old = before.get(process)
        counts = [[n - (old.pause_counts[g][b] if old else 0) for b, n in enumerate(per_gen)] for g, per_gen in enumerate(stats.pause_counts)]
        by_bucket = [sum(per_gen[b] for per_gen in counts) for b in range(len(bounds))]
        longest = max((b for b, n in enumerate(by_bucket) if n), default=None)
        summary[process] = {
            "collections": sum(by_bucket),
            "full_collections": sum(counts[2]),
            "pause_s": round(sum(stats.pause_s) - (sum(old.pause_s) if old else 0.0), 4),
            "pauses_over_10ms": sum(by_bucket[over_10ms:]),
            "longest_pause_under_s": bounds[longest] if longest is not None else None,
        }
    return summary


def step_summary(before: dict, after: dict, wall_s: float) -> tuple[dict, dict]:
    """Per device: share of the wall time in steps. Per model: its steps, tokens per step, preemptions and
    share of the device over the point, and the scheduler's prefill speed estimate at its end. Heartbeats
    are 1 s apart: +-1 s of device time either way."""
    delta = {key: value - before.get(key, 0.0) for key, value in after.items() if key[0] not in SCHEDULER_GAUGES}
    busy = {label: round(value / wall_s, 3) for (name, label), value in delta.items() if name == "prism:device_busy_seconds"}
    per_model: dict[str, dict] = {}
    for (name, label), value in delta.items():
        if name in STEP_COUNTERS:
            per_model.setdefault(label, {})[STEP_COUNTERS[name]] = value
    steps = {
        model: {
            "steps": int(c.get("steps", 0)),
            "tokens_per_step": round(c.get("tokens", 0) / c["steps"], 1) if c.get("steps") else None,
            "preemptions": int(c.get("preemptions", 0)),
            "device_share": round(c.get("device_s", 0.0) / wall_s, 3),
            **{label: round(after[(name, model)]) for name, label in SCHEDULER_GAUGES.items() if (name, model) in after},
        }
        for model, c in sorted(per_model.items()) if c.get("steps")
    }
    return busy, steps


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far, from /proc; None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def server_processes(url: str, server_pid: int | None) -> dict[str, int]:
    """The server's processes whose CPU a point reports (the client reports its own): the controller (when
    started here) and its workers."""
    processes = {}
    if server_pid is not None:
        processes["controller"] = server_pid
    workers = httpx.get(url + "/health", timeout=30).json().get("workers", {})
    processes.update({f"worker:{w}": info["pid"] for w, info in workers.items() if info.get("pid")})
    return processes


def cpu_shares(before: dict[str, float | None], after: dict[str, float | None], wall_s: float) -> dict[str, float]:
    """Each process's CPU over the point as a share of one core (1.0: one core busy throughout)."""
    return {name: round((after[name] - before[name]) / wall_s, 3) for name in after
            if after[name] is not None and before.get(name) is not None}


def run_points(url: str, jobs, models, args, slos, events: bool = False, server_pid: int | None = None) -> list[dict]:
    processes = server_processes(url, server_pid)
    if args.warmup > 0:  # not measured: first-use costs (kernel variants, allocator growth) for every policy alike
        replay_point(url, jobs, args.rate_scales[0], args.warmup, args.timeout, args.seed + 1, args.client_processes)
    points = []
    for scale in args.rate_scales:
        before = lifecycle_counts(url) if events else {}
        metrics_before = httpx.get(url + "/metrics", timeout=30).text
        cpu_before = {name: process_cpu_s(pid) for name, pid in processes.items()}
        started = time.perf_counter()
        with StateSampler(url) as sampler:
            client = replay_point(url, jobs, scale, args.duration, args.timeout, args.seed, args.client_processes)
        wall = time.perf_counter() - started
        cpu = {"client": round(client.cpu_s / wall, 3),
               **cpu_shares(cpu_before, {name: process_cpu_s(pid) for name, pid in processes.items()}, wall)}
        metrics_after = httpx.get(url + "/metrics", timeout=30).text
        summary = summarize(client.results, slos, args.slo_scale, wall)
        after = lifecycle_counts(url) if events else {}
        lifecycle = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
        busy, steps = step_summary(worker_counters(metrics_before), worker_counters(metrics_after), wall)
        server_ttft = server_ttft_attainment(slo_counts(metrics_before), slo_counts(metrics_after))
        gc_pauses = gc_summary({**gc_stats(metrics_before), "client": _no_gc(client.gc_delta)},
                               {**gc_stats(metrics_after), "client": client.gc_delta})
        points.append({"rate_scale": scale, "wall_s": wall, "lifecycle_events": lifecycle, "device_busy": busy, "steps": steps,
                       "gc": gc_pauses, "cpu_share": cpu,
                       "server_ttft_attainment": server_ttft, "state": sampler.summary(), **summary})
        o = summary["overall"]
        print(f"  scale {scale:>6g}: {o['requests']:>5} req, TTFT att {o['ttft_attainment']:.3f}, TPOT att {o['tpot_attainment']:.3f}, "
              f"(server-side {server_ttft.get('overall')}), both {o['attainment']:.3f}, errors {o['errors']}, "
              f"goodput {o['goodput_rps']:.2f} req/s, device busy {busy}, "
              f"GC pauses over 10 ms {({p: g['pauses_over_10ms'] for p, g in gc_pauses.items()})}, CPU (cores) {cpu}, "
              f"fewest free pages {({d: v['min_free_pages'] for d, v in points[-1]['state']['devices'].items()})}, "
              f"most running {({m: v['max_running'] for m, v in points[-1]['state']['models'].items()})}", flush=True)
    return points


def highest_scale(points: list[dict], key: str = "ttft_attainment", target: float = 0.99) -> float | None:
    holding = [p["rate_scale"] for p in points if p["overall"][key] >= target]
    return max(holding) if holding else None


def plot(result: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ttft, goodput) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, points in result["policies"].items():
        scales = [p["rate_scale"] for p in points]
        ttft.plot(scales, [p["overall"]["ttft_attainment"] for p in points], marker="o", label=policy)
        goodput.plot(scales, [p["overall"]["goodput_rps"] for p in points], marker="o", label=policy)
    ttft.axhline(0.99, color="grey", linestyle=":")
    ttft.set_ylabel("TTFT SLO attainment")
    goodput.set_ylabel("goodput (req/s meeting TTFT and TPOT SLOs)")
    for ax in (ttft, goodput):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rate scale")
        ax.legend()
    fig.suptitle(result.get("card", ""))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server")
    target.add_argument("--config", type=Path, help="registry to start servers from (one per policy)")
    parser.add_argument("--policies", nargs="+", default=["prism"], help="with --config: scheduler policies to compare")
    parser.add_argument("--gpu-memory-utilization", type=float, help="with --config: override the registry's share of each GPU")
    parser.add_argument("--no-overlap", dest="overlap_steps", action="store_false",
                        help="with --config: workers finish each step before planning the next (scheduler.overlap_steps: false)")
    parser.add_argument("--tpot-target", choices=TPOT_TARGETS, help="with --config: scheduler.tpot_target (default: the registry's)")
    parser.add_argument("--models", nargs="+", help="model names (default: the registry's, in order)")
    add_trace_arguments(parser, duration_s=60.0, max_output=512)
    parser.add_argument("--warmup", type=float, default=0.0, help="wall seconds replayed first, not measured")
    parser.add_argument("--slos", type=Path, help="JSON of dedicated P95s (else --calibrate measures them)")
    parser.add_argument("--calibrate", type=int, default=10, help="requests per model for the dedicated P95")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--client-processes", type=_at_least_one, default=4,
                        help="processes that send and timestamp a point's requests (1: this one; each takes its share round-robin)")
    parser.add_argument("--card", default=None, help="device name for the results (default: torch's, or cpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "replay.json")
    args = parser.parse_args()
    CLIENT_GC.install()

    if args.config is not None and not args.models:
        import yaml

        args.models = [m["name"] for m in yaml.safe_load(args.config.read_text())["models"]]
    jobs = trace_jobs(args, args.models)
    slos = json.loads(args.slos.read_text()) if args.slos else None
    result = {"benchmark": "replay", "command": " ".join(["python", *sys.argv]), "date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "card": args.card or _card(), "trace": args.trace.name, "models": args.models, "streams": args.streams,
              "slo_scale": args.slo_scale, "duration_s": args.duration, "overlap_steps": args.overlap_steps,
              "tpot_target": args.tpot_target, "policies": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.url:
        slos = slos or asyncio.run(calibrate(args.url, args.models, jobs, args.calibrate, args.timeout))
        result["dedicated_p95"] = slos
        result["policies"]["server"] = run_points(args.url, jobs, args.models, args, slos)
    else:
        from tests.controller.server_process import stop_server

        if slos is None:  # measured once, every model alone, on a prism server without SLOs of ours
            registry = policy_registry(args.config, "prism", None, args.slo_scale, args.gpu_memory_utilization)
            server = start_policy_server(registry, "prism", args.out.parent)
            try:
                slos = asyncio.run(calibrate(server.base_url, args.models, jobs, args.calibrate, args.timeout))
            finally:
                stop_server(server)
        result["dedicated_p95"] = slos
        for policy in args.policies:
            print(f"policy {policy}: starting the server", flush=True)
            registry = policy_registry(args.config, policy, slos, args.slo_scale, args.gpu_memory_utilization, args.overlap_steps,
                                       args.tpot_target)
            server = start_policy_server(registry, policy, args.out.parent)
            try:
                result["policies"][policy] = run_points(server.base_url, jobs, args.models, args, slos, events=True,
                                                         server_pid=server.process.pid)
            finally:
                stop_server(server)
                (args.out.parent / f"server-{policy}.log").write_text(server.log())  # workers' logs included
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # keep what is done if a later policy fails
    result["highest_rate_scale_at_99pct_ttft"] = {p: highest_scale(points) for p, points in result["policies"].items()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out)
    print(json.dumps(result["highest_rate_scale_at_99pct_ttft"]))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _card() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


if __name__ == "__main__":
    main()
