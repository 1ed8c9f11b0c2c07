"""Prometheus metrics. Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `prism:time_to_first_token_seconds`)
where the meaning is the same, with `model_name` as the model label.

Request metrics are recorded when a request ends; queue depths and pool pages are read from the workers'
latest heartbeats at scrape time (a custom collector), so they are never stale by more than a heartbeat.
Each app has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from workers.contract.messages import GC_PAUSE_BUCKETS_S, GcStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
ACTIVATION_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, state_source: Callable[[], Iterable] | None = None,
                 gc_source: Callable[[], Iterable[tuple[str, GcStats]]] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("prism:time_to_first_token_seconds", "Time to first token (arrival to first token, activation wait included).", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("prism:time_per_output_token_seconds", "Mean time per output token after the first, per request.", labels, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("prism:e2e_request_latency_seconds", "Arrival to last token.", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("prism:requests", "Requests by outcome (stop, length, abort, error, rejected).", labels + ["outcome"], registry=r)
        self.slo_met = Counter("prism:slo_met", "Requests that met an objective (slo = ttft | tpot).", labels + ["slo"], registry=r)
        self.slo_missed = Counter("prism:slo_missed", "Requests that missed an objective (slo = ttft | tpot).", labels + ["slo"], registry=r)
        self.prompt_tokens = Counter("prism:prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=r)
        self.generation_tokens = Counter("prism:generation_tokens", "Generated tokens.", labels, registry=r)
        self.activations = Counter("prism:model_activations", "Model activations (outcome = ok | failed).", labels + ["outcome"], registry=r)
        self.activation_seconds = Histogram("prism:model_activation_seconds", "Activation time, request to ready.", labels, buckets=ACTIVATION_BUCKETS, registry=r)
        self.evictions = Counter("prism:model_evictions", "Model evictions by reason.", labels + ["reason"], registry=r)
        self.eviction_seconds = Histogram("prism:model_eviction_seconds", "Eviction time (drain included).", labels, buckets=ACTIVATION_BUCKETS, registry=r)
        if state_source is not None:
            self.registry.register(_StateCollector(state_source))
        if gc_source is not None:
            self.registry.register(_GcCollector(gc_source))
        self.attainment: dict[tuple[str, str], list[int]] = {}  # (model, slo) -> [met, missed], for the admin API

    def slo_attainment(self, model: str) -> dict[str, float | None]:
        result = {}
        for slo in ("ttft", "tpot"):
            met, missed = self.attainment.get((model, slo), (0, 0))
            result[slo] = met / (met + missed) if met + missed else None
        return result

    def _count_slo(self, model: str, slo: str, met: bool) -> None:
        (self.slo_met if met else self.slo_missed).labels(model, slo).inc()
        counts = self.attainment.setdefault((model, slo), [0, 0])
        counts[0 if met else 1] += 1

    def request_finished(self, model: str, outcome: str, prompt_tokens: int, generated: int, ttft_s: float | None,
                         tpot_s: float | None, e2e_s: float, ttft_slo_s: float, tpot_slo_s: float) -> None:
        self.requests.labels(model, outcome).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generated)
        self.e2e.labels(model).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
            self._count_slo(model, "ttft", ttft_s <= ttft_slo_s)
        if tpot_s is not None:
            self.tpot.labels(model).observe(tpot_s)
            self._count_slo(model, "tpot", tpot_s <= tpot_slo_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read at scrape time from (device, heartbeat, controller queue) tuples."""

    def __init__(self, source: Callable[[], Iterable]):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        running = GaugeMetricFamily("prism:num_requests_running", "Requests running on a worker.", labels=["model_name"])
        waiting = GaugeMetricFamily("prism:num_requests_waiting", "Requests queued on a worker.", labels=["model_name"])
        kv_usage = GaugeMetricFamily("prism:kv_cache_usage_perc", "Share of a model's KV blocks in use.", labels=["model_name"])
        pages = GaugeMetricFamily("prism:pool_pages", "Pool pages of a device by kind (weights, kv, free, reserved).", labels=["device", "kind"])
        model_pages = GaugeMetricFamily("prism:pool_model_pages", "Pool pages mapped per model and kind.", labels=["device", "model_name", "kind"])
        pending = GaugeMetricFamily("prism:num_requests_in_flight", "Requests accepted by the controller and not finished.", labels=["model_name"])
        busy = CounterMetricFamily("prism:device_busy_seconds", "Time the worker's steps were in flight on the device (CUDA events; host gaps inside a step count).", labels=["device"])
        steps = CounterMetricFamily("prism:model_steps", "Engine steps run per model.", labels=["model_name"])
        step_tokens = CounterMetricFamily("prism:model_scheduled_tokens", "Tokens computed in steps (prefill and decode) per model.", labels=["model_name"])
        step_seconds = CounterMetricFamily("prism:model_step_device_seconds", "Device time of a model's steps.", labels=["model_name"])
        preemptions = CounterMetricFamily("prism:num_preemptions", "Running sequences preempted (KV freed, recomputed later).", labels=["model_name"])
        prefill_speed = GaugeMetricFamily("prism:prefill_speed_estimate_tokens_per_second",
                                          "The local scheduler's prefill speed estimate, behind its TTFT predictions.", labels=["model_name"])
        for device, beat, in_flight in self.source():
            for model, count in in_flight.items():
                pending.add_metric([model], count)
            if beat is None:
                continue
            for stats in beat.models:
                running.add_metric([stats.name], stats.num_running)
                waiting.add_metric([stats.name], stats.num_waiting)
                kv_usage.add_metric([stats.name], stats.num_kv_blocks_used / max(1, stats.num_kv_blocks_total))
                steps.add_metric([stats.name], stats.num_steps)
                step_tokens.add_metric([stats.name], stats.num_scheduled_tokens)
                step_seconds.add_metric([stats.name], stats.step_device_s)
                preemptions.add_metric([stats.name], stats.num_preemptions)
                prefill_speed.add_metric([stats.name], stats.prefill_tokens_per_s)
            busy.add_metric([device], beat.device_busy_s)
            pool = beat.pool
            weights = sum(pool.weight_pages_by_model.values())
            kv = sum(pool.kv_pages_by_model.values())
            for kind, value in (("weights", weights), ("kv", kv), ("free", pool.pages_free), ("reserved", pool.pages_reserved)):
                pages.add_metric([device, kind], value)
            for model, count in pool.kv_pages_by_model.items():
                model_pages.add_metric([device, model, "kv"], count)
            for model, count in pool.weight_pages_by_model.items():
                model_pages.add_metric([device, model, "weights"], count)
        yield from (running, waiting, kv_usage, pages, model_pages, pending, busy, steps, step_tokens, step_seconds, preemptions, prefill_speed)


class _GcCollector:
    """The processes' garbage collection pauses (controller and workers), read at scrape time."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, GcStats]]]):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        pauses = HistogramMetricFamily("prism:gc_pause_seconds", "Garbage collection pauses by process and generation.",
                                       labels=["process", "generation"])
        frozen = GaugeMetricFamily("prism:gc_frozen_objects", "Objects in the permanent generation, which collections skip.", labels=["process"])
        bounds = [str(b) for b in GC_PAUSE_BUCKETS_S] + ["+Inf"]
        for process, stats in self.source():
            for generation, (counts, seconds) in enumerate(zip(stats.pause_counts, stats.pause_s)):
                pauses.add_metric([process, str(generation)], list(zip(bounds, itertools.accumulate(counts))), seconds)
            frozen.add_metric([process], stats.frozen_objects)
        yield from (pauses, frozen)
