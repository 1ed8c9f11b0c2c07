"""Replay a trace through the real local scheduler on a modelled device: no GPU, no server, seconds of CPU.

    python benchmarks/simulate.py --config configs/prism-8models.yaml --kv-gb 10.9 \
        --slos slos.json --streams 2 14 3 10 5 19 23 24 --rate-scales 8 16 24 --out sim.json

What is real: `LocalScheduler` and its policies (prism, or fcfs with per-model KV caps for `static`),
the trace, the models' shapes and the SLOs (the same `--slos` file of dedicated P95s as `replay.py`).
What is modelled: the device and the clock. A step of model m takes

    overhead + (weight bytes + bytes of the KV its chunks attend to) / bandwidth + prefill tokens x 2 x parameters / compute

and a step with prefill that runs eager (more than `--prefill-graph-tokens` tokens: above the engine's
prefill graphs) at least as long as its launches (`--eager-us-per-layer` of host time a layer,
measured); one step after another (as if the host never made the device wait between steps: perfect
overlap). `--split-min-decodes` models the engine's split of such steps (decodes in a decode graph, the
prompt chunks apart: the weights read twice). Both default to the engine's values. The defaults fit the measured
engine: 8B decode 5.6 ms and 1B 1.3 ms (dedicated TPOT P95s on the H200: 5.1 and 1.4 ms); 8B prefill
of 512 / 2048 tokens 23 / 67 ms (H100 engine benchmark: 23 / 65 ms). KV memory is a byte budget of
`--kv-gb`, shared by all models (prism), or split equally among them (static, as `StaticPlacement`).

`--kv-backing pool` replaces the byte budget with the real memory layer: every model's KV is a `KVSpace`
(as the engine makes it) on a host-backend `PagePool` of the weights plus `--kv-gb`, all weights mapped,
a scratch block each, idle pages trimmed once a simulated second as the worker's heartbeat does; so page
granularity, blocks that straddle pages and hysteresis count. It needs that much address space, not memory.

`--prefill-speed oracle` gives the scheduler the model's true prefill speed instead of its online
estimate: how much better predictions would be worth. Use it to compare policies and scheduler inputs
before spending device time; the GPU replay remains the measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchmarks.replay import Result, TraceRequest, add_trace_arguments, highest_scale, plot, summarize, trace_jobs  # noqa: E402
from scheduler.local import LocalScheduler, ModelQueue, StepPlan  # noqa: E402
from scheduler.local_policy import DEFAULT_TPOT_TARGET, TPOT_TARGETS  # noqa: E402
from scheduler.prefill_order import PrefillSpeed  # noqa: E402
from scheduler.sequence import Sequence  # noqa: E402
from workers.step_loop import StepCounts  # noqa: E402
from controller.registry import ModelConfig, load_registry  # noqa: E402
from workers.contract.sizing import Arch, ModelSize  # noqa: E402



@dataclass(frozen=True)
class Device:
    bandwidth_bytes_s: float = 3.15e12  # one read of the 8B's 16.06 GB in 5.1 ms
    flops: float = 6.0e14  # dense bf16 throughput reached by prefill (8B, 2048 tokens in 65 ms on the H100)
    overhead_s: float = 0.5e-3  # per step: launches, sampling, the last token's copy
    eager_s_per_layer: float = 400e-6
    """Host time to launch one layer of an eager step (a step with prefill): the device cannot finish such
    a step sooner. H200 (results/step_cost-h200.json): an eager decode step takes 13.2 ms for the 8B
    (32 layers, 32 decodes) and 6.6 ms for the 1B (16 layers), launch-bound; graphed 5.5 and 1.5 ms."""
    split_min_decodes: int = 64
    """From this many decodes on, a step with prefill runs its decodes as a graph and its prefill apart
    (the engine's SPLIT_MIN_DECODES); the weights are read twice. 0: never split."""
    prefill_graph_tokens: int = 512
    """A step with prefill of at most this many tokens (its prompt chunks when split, else all of them) is
    a graph replay: no launch floor (the engine's largest prefill graph). 0: every such step eager."""


@dataclass(frozen=True)
class Host:
    """The host's share of a step, when modelled: the engine's fixed work plus the local scheduler's
    measured time (this machine's wall clock, scaled). With overlap a step cycle is the longer of the
    device's step and the host's."""

    engine_s: float = 0.6e-3  # input staging, launches, output handling: 1B dedicated TPOT minus its device time
    scheduler_scale: float = 1.0  # the scheduler's measured time x this (a faster host: < 1)


@dataclass(frozen=True)
class SimModel:
    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    flops_per_token: float
    num_layers: int
    max_num_seqs: int
    max_num_batched_tokens: int

    @classmethod
    def from_registry(cls, config: ModelConfig, device: str = "cuda:0") -> SimModel:
        """A model of a validated registry (its defaults are the registry's), sized as the controller sizes it."""
        arch = Arch.from_hf_config(json.loads(config.config.read_text()))
        size = ModelSize.of(arch, config.dtype, device)
        return cls(config.name, size.weight_bytes, size.kv_bytes_per_token, 2.0 * arch.num_parameters(), arch.num_layers,
                   config.max_num_seqs, config.max_num_batched_tokens)

    def step_s(self, plan: StepPlan, device: Device) -> float:
        """A graphed step: its device work. An eager one (with prefill, above the prefill graphs): the
        longer of its launches and its device work. Split, the device reads the weights once more (the
        decode graph, then the prefill)."""
        attended = sum(c.start + c.num_new_tokens for c in plan.chunks)
        prefill = sum(c.num_new_tokens for c in plan.chunks if c.start < c.seq.num_prompt_tokens)
        memory_s = (self.weight_bytes + attended * self.kv_bytes_per_token) / device.bandwidth_bytes_s
        work_s = memory_s + prefill * self.flops_per_token / device.flops
        if not prefill:
            return device.overhead_s + work_s
        decodes = sum(c.num_new_tokens == 1 for c in plan.chunks)
        graphed_tokens = sum(c.num_new_tokens for c in plan.chunks)
        if device.split_min_decodes and decodes >= device.split_min_decodes:
            work_s += self.weight_bytes / device.bandwidth_bytes_s
            graphed_tokens -= decodes
        if graphed_tokens <= device.prefill_graph_tokens:
            return device.overhead_s + work_s
        return device.overhead_s + max(device.eager_s_per_layer * self.num_layers, work_s)

    def prefill_tokens_per_s(self, device: Device) -> float:
        return device.flops / self.flops_per_token


class ByteBudget:
    """KV memory as bytes: what the page pool is to the models sharing it, without pages."""

    def __init__(self, capacity_bytes: int):
        self.free_bytes = capacity_bytes


class BudgetAllocator:
    """One model's KV blocks, drawn from a `ByteBudget` (shared by all models, or its own)."""

    def __init__(self, budget: ByteBudget, block_bytes: int, max_blocks: int):
        self.budget, self.block_bytes, self.max_blocks = budget, block_bytes, max_blocks
        self._next = 0

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks * self.block_bytes > self.budget.free_bytes:
            return None
        self.budget.free_bytes -= num_blocks * self.block_bytes
        self._next += num_blocks
        return list(range(self._next - num_blocks, self._next))

    def free(self, block_ids: list[int]) -> None:
        self.budget.free_bytes += len(block_ids) * self.block_bytes


class PoolBacking:
    """The models' KV on the real memory layer: a host `PagePool` holding every model's weights and KV."""

    HEARTBEAT_S = 1.0  # the worker trims idle KV pages this often (workers/worker.py)

    def __init__(self, models: list[SimModel], kv_bytes: int, block_size: int):
        from memory import HostBackend, KVSpace, MemoryKind, PagePool

        self.pool = PagePool(HostBackend(), sum(m.weight_bytes for m in models) + kv_bytes)
        self.spaces: dict[str, KVSpace] = {}
        self.fewest_free_pages = None
        self._last_trim_s = 0.0
        for m in models:
            weights = self.pool.reserve_range(m.name, MemoryKind.WEIGHTS, m.weight_bytes)
            if not self.pool.map_pages(weights, range(weights.num_pages)):
                raise ValueError(f"the pool cannot hold the weights of {m.name}")
        for m in models:
            kv = KVSpace.for_model(self.pool, m.name, m.kv_bytes_per_token * block_size, trim_on_free=False)
            kv.allocate(1)  # the engine's scratch block (padding rows of decode graphs)
            self.spaces[m.name] = kv
        self._note_free()

    def allocator(self, model: str, cap_bytes: int | None):
        from memory import CappedKV

        kv = self.spaces[model]
        return kv if cap_bytes is None else CappedKV(kv, cap_bytes // kv.block_bytes)

    def tick(self, now: float, scheduler: LocalScheduler) -> None:
        self._note_free()
        if now - self._last_trim_s < self.HEARTBEAT_S:
            return
        self._last_trim_s = now
        for name, queue in scheduler.queues.items():
            self.spaces[name].trim_idle(bool(queue.running or queue.waiting))

    def _note_free(self) -> None:
        free = self.pool.num_free_pages
        self.fewest_free_pages = free if self.fewest_free_pages is None else min(self.fewest_free_pages, free)

    def close(self) -> None:
        for kv in self.spaces.values():
            kv.close()
        self.pool.close()


class OracleSpeed(PrefillSpeed):
    """The models' true prefill speeds, never updated: the scheduler's prefill predictions are exact."""

    def __init__(self, tokens_per_s: dict[str, float]):
        super().__init__()
        self.true_tokens_per_s = dict(tokens_per_s)

    def observe(self, model: str, num_tokens: int, elapsed_s: float) -> None:
        pass

    def tokens_per_s(self, model: str) -> float:
        return self.true_tokens_per_s[model]


def simulate(models: list[SimModel], jobs: list[tuple[TraceRequest, str]], policy: str, kv_bytes: int, slos: dict,
             slo_scale: float, rate_scale: float, duration_s: float, device: Device, oracle: bool = False,
             host: Host | None = None, block_size: int = 16, overlap: bool = True, tpot_target: str = DEFAULT_TPOT_TARGET,
             kv_backing: str = "bytes") -> dict:
    """One point: the jobs arriving within `duration_s` at `rate_scale`, run to the end; `replay.summarize`'s output.

    `overlap` (the worker's default; not with `host`): the next step is planned while one runs and starts
    when it ends, so the running step's model is never planned next, as in `workers/step_loop.py`.
    Without it steps are planned one after another on the results of the last. Deterministic without
    `host`; with it (serial), the scheduler's own wall time enters the step times. `kv_backing`: `bytes`
    (a byte budget) or `pool` (`PoolBacking`: the real memory layer)."""
    speed = OracleSpeed({m.name: m.prefill_tokens_per_s(device) for m in models}) if oracle else PrefillSpeed()
    scheduler = LocalScheduler("prism" if policy == "prism" else "fcfs", clock=lambda: 0.0, prefill_speed=speed, tpot_target=tpot_target)
    shared = ByteBudget(kv_bytes)
    backing = PoolBacking(models, kv_bytes, block_size) if kv_backing == "pool" else None
    for m in models:
        budget = shared if policy == "prism" else ByteBudget(kv_bytes // len(models))
        block_bytes = m.kv_bytes_per_token * block_size
        if backing is None:
            allocator = BudgetAllocator(budget, block_bytes, budget.free_bytes // block_bytes)
        else:
            allocator = backing.allocator(m.name, None if policy == "prism" else kv_bytes // len(models))
        slo = slos[m.name]
        scheduler.add_model(ModelQueue(
            m.name, allocator, block_size, m.max_num_seqs,
            m.max_num_batched_tokens, ttft_slo_s=slo["ttft_p95_s"] * slo_scale, tpot_slo_s=slo["tpot_p95_s"] * slo_scale))
    by_name = {m.name: m for m in models}
    arrivals = [(r.time_s / rate_scale, r, name) for r, name in jobs if r.time_s <= duration_s * rate_scale]
    seqs: list[Sequence] = []
    counts = StepTally()
    now, next_arrival = 0.0, 0
    running: tuple[StepPlan, float, float] | None = None  # with overlap: the step on the device, its time and its end
    while next_arrival < len(arrivals) or scheduler.has_work():
        if backing is not None:
            backing.tick(now, scheduler)
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= now:
            seqs.append(_admit(scheduler, len(seqs), *arrivals[next_arrival]))
            next_arrival += 1
        started = time.perf_counter()
        plan = scheduler.schedule(now)  # with a step running, its model is skipped (as in the worker)
        scheduler_s = time.perf_counter() - started
        if running is not None:  # `plan` was made while that step runs and starts when it ends
            running_plan, running_s, now = running
            scheduler.update(running_plan, _sampled(running_plan), now, device_s=running_s)
            if plan is not None:
                step_s = by_name[plan.model].step_s(plan, device)
                counts.add(plan, step_s)
                running = (plan, step_s, now + step_s)
            else:
                running = None
            continue
        if plan is None:
            if next_arrival == len(arrivals):
                raise RuntimeError("the scheduler has work but plans none: a deadlock")
            now = max(now, arrivals[next_arrival][0])
            continue
        step_s = by_name[plan.model].step_s(plan, device)
        counts.add(plan, step_s)
        if overlap and host is None:
            running = (plan, step_s, now + step_s)
            continue
        if host is None:
            now += step_s
            scheduler.update(plan, _sampled(plan), now, device_s=step_s)
            continue
        started = time.perf_counter()
        scheduler.update(plan, _sampled(plan), now + step_s, device_s=step_s)  # stamps tokens at the device's end
        scheduler_s += time.perf_counter() - started
        now += max(step_s, host.engine_s + scheduler_s * host.scheduler_scale)
    results = [_result(seq) for seq in seqs]
    wall_s = max(now, 1e-9)
    memory = {}
    if backing is not None:
        memory = {"fewest_free_pages": backing.fewest_free_pages, "pool_pages": backing.pool.budget_pages}
        backing.close()
    return {"rate_scale": rate_scale, "simulated_s": now, "device_busy": round(counts.device_s() / wall_s, 3),
            "steps": counts.summary(wall_s), **({"memory": memory} if memory else {}),
            **summarize(results, slos, slo_scale, wall_s)}


class StepTally:
    """Per model: steps, tokens scheduled and modelled device time (the worker's `StepCounts`), summed up
    in the shape of replay.py's `steps`."""

    def __init__(self):
        self.by_model: dict[str, StepCounts] = {}

    def add(self, plan: StepPlan, step_s: float) -> None:
        counts = self.by_model.setdefault(plan.model, StepCounts())
        counts.steps += 1
        counts.tokens += sum(c.num_new_tokens for c in plan.chunks)
        counts.device_s += step_s

    def device_s(self) -> float:
        return sum(c.device_s for c in self.by_model.values())

    def summary(self, wall_s: float) -> dict:
        return {m: {"steps": c.steps, "tokens_per_step": round(c.tokens / c.steps, 1), "device_share": round(c.device_s / wall_s, 3)}
                for m, c in sorted(self.by_model.items())}


def _sampled(plan: StepPlan) -> dict[str, int]:
    return {c.seq.req_id: 1 for c in plan.chunks if c.samples}


def _admit(scheduler: LocalScheduler, index: int, arrival_s: float, request: TraceRequest, model: str) -> Sequence:
    queue = scheduler.queues[model]
    seq = Sequence(f"r{index}", model, [1] * max(1, request.prompt_len), max(1, request.output_len), arrival_s,
                   min_tokens=max(1, request.output_len), ttft_deadline_s=arrival_s + queue.ttft_slo_s)
    scheduler.add(seq)
    return seq


def _result(seq: Sequence) -> Result:
    ttft = None if seq.first_token_s is None else seq.first_token_s - seq.arrival_s
    tpot = None
    if seq.num_output_tokens > 1:
        tpot = (seq.last_token_s - seq.first_token_s) / (seq.num_output_tokens - 1)
    return Result(seq.model, seq.arrival_s, ttft, tpot, seq.num_output_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="registry: the models (shapes, limits), in order")
    parser.add_argument("--slos", type=Path, required=True,
                        help="dedicated P95s per model: a JSON of them, or a replay result holding them (dedicated_p95)")
    parser.add_argument("--kv-gb", type=float, default=10.9,
                        help="KV memory of the device, GB (after weights): 10.9 is the H200 replays' pool (70.18 GiB) less 64.5 GB of weights")
    parser.add_argument("--policies", nargs="+", default=["prism", "static"], choices=["prism", "static"])
    parser.add_argument("--prefill-speed", choices=["learned", "oracle"], default="learned")
    parser.add_argument("--kv-backing", choices=["bytes", "pool"], default="bytes",
                        help="KV memory as a byte budget, or as the real page pool and KV spaces (host backend)")
    parser.add_argument("--tpot-targets", nargs="+", choices=TPOT_TARGETS, default=[DEFAULT_TPOT_TARGET],
                        help="scheduler.tpot_target of the prism policy: each one given is a run of its own")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="plan each step on the results of the last (a worker with scheduler.overlap_steps: false)")
    parser.add_argument("--eager-us-per-layer", type=float, default=Device.eager_s_per_layer * 1e6,
                        help="host launch time per layer of an eager step (a step with prefill)")
    parser.add_argument("--split-min-decodes", type=int, default=Device.split_min_decodes,
                        help="model the engine's split of mixed steps from this many decodes on (0: no split)")
    parser.add_argument("--prefill-graph-tokens", type=int, default=Device.prefill_graph_tokens,
                        help="steps with prefill up to this many tokens are graph replays, no launch floor (0: all eager)")
    parser.add_argument("--host", action="store_true", help="model the host too (serial steps): engine work plus the scheduler's measured time")
    parser.add_argument("--host-engine-ms", type=float, default=Host.engine_s * 1e3)
    parser.add_argument("--host-scheduler-scale", type=float, default=1.0, help="scale the scheduler's measured time (faster host: < 1)")
    add_trace_arguments(parser, duration_s=25.0, max_output=256)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "simulate.json")
    args = parser.parse_args()

    models = [SimModel.from_registry(config) for config in load_registry(args.config).models]
    jobs = trace_jobs(args, [m.name for m in models])
    slos = json.loads(args.slos.read_text())
    slos = slos.get("dedicated_p95", slos)
    device = Device(eager_s_per_layer=args.eager_us_per_layer / 1e6, split_min_decodes=args.split_min_decodes,
                    prefill_graph_tokens=args.prefill_graph_tokens)
    host = Host(args.host_engine_ms / 1e3, args.host_scheduler_scale) if args.host else None
    result = {"benchmark": "simulate", "command": " ".join(["python", *sys.argv]), "date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "card": "modelled (H200 fit)", "device": device.__dict__, "host": host.__dict__ if host else None, "kv_gb": args.kv_gb,
              "kv_backing": args.kv_backing, "prefill_speed": args.prefill_speed,
              "overlap": args.overlap and host is None,
              "trace": args.trace.name, "models": [m.name for m in models], "streams": args.streams, "slo_scale": args.slo_scale,
              "duration_s": args.duration, "policies": {}}
    runs = [(policy, target) for policy in args.policies for target in (args.tpot_targets if policy == "prism" else [DEFAULT_TPOT_TARGET])]
    for policy, target in runs:
        label = policy if target == DEFAULT_TPOT_TARGET else f"{policy}, tpot_target={target}"
        points = []
        for scale in args.rate_scales:
            point = simulate(models, jobs, policy, int(args.kv_gb * 1e9), slos, args.slo_scale, scale, args.duration, device,
                             oracle=args.prefill_speed == "oracle", host=host, overlap=args.overlap, tpot_target=target,
                             kv_backing=args.kv_backing)
            o = point["overall"]
            print(f"{label:>7} scale {scale:>5g}: {o['requests']:>5} req, TTFT att {o['ttft_attainment']:.3f}, "
                  f"TPOT att {o['tpot_attainment']:.3f}, goodput {o['goodput_rps']:.2f} req/s", flush=True)
            points.append(point)
        result["policies"][label] = points
    result["highest_rate_scale_at_99pct_ttft"] = {p: highest_scale(points) for p, points in result["policies"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out)
    print(json.dumps(result["highest_rate_scale_at_99pct_ttft"]))


if __name__ == "__main__":
    main()
