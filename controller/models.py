"""The model manager: which models are resident where, and carrying out the global scheduler's decisions.

Every registry model has a runtime state (inactive -> activating -> active -> evicting -> inactive) and a
device. A request for a model that is not active waits here (its wait counts in its TTFT): the global
scheduler (scheduler/placement.py) decides where to activate it and which idle models to evict for
room, and the manager carries that out through the workers. A periodic cycle asks the scheduler for
pending activations, evictions under memory pressure, idle evictions and migrations. Evicting a model
first stops new requests from reaching it and drains those in flight (up to a timeout; the rest fail
clearly), then unmaps it on its worker. Pinned models are never evicted. Every activation and
eviction, with its duration, goes to the event log and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from controller.catalog import CatalogEntry
from controller.errors import Unavailable
from controller.events import EventLog
from controller.metrics import Metrics
from controller.registry import Registry
from controller.worker_handle import WorkerGone, WorkerHandle
from scheduler.cluster import Activate, ClusterState, DeviceInfo, Evict, Migrate, ModelInfo, ModelState
from scheduler.placement import GlobalScheduler, PlacementConfig
from scheduler.pressure import EvictionCost, PressureModel, compute_share
from scheduler.rates import RateTracker

logger = logging.getLogger("prism.controller")

CYCLE_S = 0.5
STARTUP_TIMEOUT_S = 600.0  # a worker's first start (imports, CUDA init, page creation)
# Rough device speeds for the scheduler's compute term (a decode step reads the weights once).
MEMORY_BANDWIDTH = {"cpu": 2e10, "cuda": 3e12}
PREFILL_TOKENS_PER_S = {"cpu": 500.0, "cuda": 20000.0}
LOAD_BANDWIDTH = {"cpu": 2e9, "cuda": 5e10}


@dataclass(eq=False)
class ModelRuntime:
    entry: CatalogEntry
    weight_bytes: int
    kv_bytes_per_token: int
    pinned: bool
    state: ModelState = ModelState.INACTIVE
    device: str | None = None
    kv_budget_bytes: int | None = None  # a fixed KV cap (static baseline); None: elastic
    num_waiting: int = 0  # requests waiting for it to become active
    num_running: int = 0  # requests submitted to its worker
    activated_s: float | None = None
    error: str | None = None  # why the last activation failed for good
    last_activation: dict = field(default_factory=dict)
    activating: asyncio.Task | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.entry.name

    def notify(self) -> None:
        """Wake everyone waiting on a change of this model's state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._changed.wait(), timeout_s)


class ModelManager:
    def __init__(self, registry: Registry, catalog: dict[str, CatalogEntry], workers: dict[str, WorkerHandle],
                 metrics: Metrics, events: EventLog):
        self.registry = registry
        self.catalog = catalog
        self.workers = workers
        self.metrics = metrics
        self.events = events
        sched = registry.scheduler
        self.rates = RateTracker(window_s=sched.rate_window_s)
        self.global_scheduler = GlobalScheduler(sched.policy, self._placement_config())
        self.local_policy = "prism" if sched.policy == "prism" else "fcfs"
        self.runtimes: dict[str, ModelRuntime] = {}
        for entry in catalog.values():
            self.add_runtime(entry)
        self._plan_lock = asyncio.Lock()  # one placement decision at a time: memory is never double-booked
        self._cycle: asyncio.Task | None = None
        self.restoring: dict[str, str] = {}  # model -> worker id: resident there when the worker died
        for worker in workers.values():
            worker.on_exit = self._on_worker_exit
            worker.on_ready = self._on_worker_ready

    def _placement_config(self) -> PlacementConfig:
        s = self.registry.scheduler
        devices = {d.split(":")[0] for d in self.workers} if self.workers else {"cpu"}
        load_bandwidth = min(LOAD_BANDWIDTH[d] for d in devices)
        return PlacementConfig(
            idle_evict_s=s.idle_evict_s, max_idle_s=s.max_idle_s, migration_gain=s.migration_gain,
            migration_cooldown_s=s.migration_cooldown_s, max_models_per_device=s.max_models_per_device,
            swap_keep_alive_s=s.swap_keep_alive_s,
            pressure=PressureModel(min_kv_reserve_tokens=s.min_kv_reserve_tokens),
            eviction=EvictionCost(load_bytes_per_s=load_bandwidth),
        )

    def add_runtime(self, entry: CatalogEntry) -> ModelRuntime:
        import torch

        from workers.weights.layout import WeightLayout

        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[entry.config.dtype]
        first_device = next(iter(self.workers), "cpu")
        dtype = dtype or (torch.float32 if first_device == "cpu" else torch.bfloat16)
        runtime = ModelRuntime(
            entry=entry,
            weight_bytes=WeightLayout.of(entry.arch, dtype).num_bytes,
            kv_bytes_per_token=entry.arch.kv_bytes_per_token(dtype),
            pinned=entry.config.pinned,
        )
        self.runtimes[entry.name] = runtime
        return runtime

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Activate pinned models, then the others in registry order while they fit without evicting."""
        for worker in self.workers.values():
            await worker.wait_ready(STARTUP_TIMEOUT_S)
        ordered = sorted(self.runtimes.values(), key=lambda r: not r.pinned)
        for runtime in ordered:
            if self.global_scheduler.policy.name != "prism" and not runtime.pinned:
                continue  # the baselines decide themselves (static: all at once in its first cycle)
            await self._activate(runtime, device=None, reason="startup", allow_evictions=runtime.pinned)
        self._cycle = asyncio.create_task(self._run_cycles(), name="placement-cycle")

    async def stop(self) -> None:
        if self._cycle is not None:
            self._cycle.cancel()
        for runtime in self.runtimes.values():
            if runtime.activating is not None:
                runtime.activating.cancel()

    async def _run_cycles(self) -> None:
        while True:
            await asyncio.sleep(CYCLE_S)
            try:
                await self.cycle()
            except Exception:  # a failed cycle must not stop placement; the next one retries
                logger.exception("placement cycle failed")

    async def cycle(self) -> None:
        """One periodic decision: pending activations, evictions, at most one migration."""
        async with self._plan_lock:
            actions = self.global_scheduler.plan(time.monotonic(), self.cluster_state())
        for action in actions:
            if isinstance(action, Activate):
                self._start_activation(self.runtimes[action.model], action.device, "scheduler", action.kv_budget_bytes)
            elif isinstance(action, Evict):
                asyncio.create_task(self.evict(action.model, action.reason))
            elif isinstance(action, Migrate):
                asyncio.create_task(self._migrate(action))

    # --- requests ---------------------------------------------------------------------------------

    async def acquire(self, model: str, num_prompt_tokens: int, timeout_s: float) -> WorkerHandle:
        """The worker of an active `model`, activating it first if needed; the caller must `release`."""
        runtime = self.runtimes[model]
        self.rates.on_request(time.monotonic(), model, num_prompt_tokens)
        runtime.num_waiting += 1
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if runtime.state is ModelState.ACTIVE and self.workers[runtime.device].state == "ready":
                    runtime.num_running += 1
                    return self.workers[runtime.device]
                if runtime.error is not None:
                    raise Unavailable(f"model {model!r} cannot be activated: {runtime.error}", retry_after_s=30)
                if runtime.state is ModelState.INACTIVE and runtime.activating is None:
                    self._start_activation(runtime, None, "request")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(f"model {model!r} is not available yet ({runtime.state.value}); retry later", retry_after_s=5)
                try:
                    await runtime.changed(min(remaining, CYCLE_S * 4))
                except asyncio.TimeoutError:
                    pass  # re-check: a cycle may have found room meanwhile
        finally:
            runtime.num_waiting -= 1

    def release(self, model: str, num_generated: int) -> None:
        runtime = self.runtimes.get(model)
        if runtime is None:
            return
        runtime.num_running -= 1
        self.rates.on_decode(time.monotonic(), model, num_generated)
        if runtime.num_running == 0:
            runtime.notify()  # an eviction may be draining

    # --- activation -------------------------------------------------------------------------------

    def _start_activation(self, runtime: ModelRuntime, device: str | None, reason: str, kv_budget: int | None = None) -> None:
        if runtime.activating is not None or runtime.state is not ModelState.INACTIVE:
            return
        runtime.activating = asyncio.create_task(self._activate(runtime, device, reason, kv_budget=kv_budget))

    async def activate(self, model: str, device: str | None = None) -> dict:
        """Admin: activate now (optionally on `device`), evicting idle models if needed."""
        runtime = self.runtimes[model]
        if runtime.state is ModelState.ACTIVE:
            return {"model": model, "state": "active", "device": runtime.device}
        if runtime.activating is not None:
            await asyncio.shield(runtime.activating)
        else:
            runtime.error = None
            runtime.activating = asyncio.current_task()
            await self._activate(runtime, device, "admin")
        if runtime.state is not ModelState.ACTIVE:
            raise Unavailable(f"model {model!r} could not be activated: {runtime.error or 'no room on any device now'}", retry_after_s=5)
        return {"model": model, "state": "active", "device": runtime.device, "times": runtime.last_activation}

    async def _activate(self, runtime: ModelRuntime, device: str | None, reason: str, kv_budget: int | None = None,
                        allow_evictions: bool = True) -> None:
        try:
            started = time.monotonic()
            async with self._plan_lock:
                if runtime.state is not ModelState.INACTIVE:
                    return
                plan = self._plan_activation(runtime, device)
                target = next((a for a in plan if isinstance(a, Activate) and a.model == runtime.name), None)
                victims = [a for a in plan if isinstance(a, Evict)]
                if target is None or (victims and not allow_evictions):
                    return  # no room now: requests wait; a later cycle (or a finished request) retries
                for victim in victims:
                    self.runtimes[victim.model].state = ModelState.EVICTING
                runtime.state, runtime.device = ModelState.ACTIVATING, target.device
                runtime.kv_budget_bytes = kv_budget if kv_budget is not None else target.kv_budget_bytes
                runtime.notify()
            for victim in victims:
                await self._evict_now(self.runtimes[victim.model], victim.reason)
            await self._load(runtime, reason, started)
        finally:
            runtime.activating = None

    def _plan_activation(self, runtime: ModelRuntime, device: str | None) -> list:
        state = self.cluster_state()
        if device is None:
            return self.global_scheduler.on_arrival(time.monotonic(), runtime.name, state)
        # A device chosen by the operator: plan as if the model preferred it and only that device existed.
        only = ClusterState(
            tuple(d for d in state.devices if d.device_id == device),
            tuple(m if m.name != runtime.name else _with(m, preferred_device=device) for m in state.models),
        )
        if not only.devices:
            raise Unavailable(f"no worker on device {device!r}")
        return self.global_scheduler.on_arrival(time.monotonic(), runtime.name, only)

    async def _load(self, runtime: ModelRuntime, reason: str, started: float) -> None:
        worker = self.workers[runtime.device]
        spec = runtime.entry.spec(runtime.device, self.registry.memory.block_size, runtime.kv_budget_bytes)
        try:
            reply = await worker.activate(spec)
        except WorkerGone as exc:
            reply = None
            error, kind = str(exc), "no_memory"  # transient: retried once the worker is back
        else:
            error, kind = reply.error, reply.error_kind
        elapsed = time.monotonic() - started
        if error is None:
            runtime.state, runtime.activated_s = ModelState.ACTIVE, time.monotonic()
            runtime.last_activation = {"total_s": elapsed, "worker_s": reply.total_s, "stage_s": reply.stage_s,
                                       "map_copy_s": reply.map_copy_s, "build_s": reply.build_s, "graphs_s": reply.graphs_s}
            self.metrics.activations.labels(runtime.name, "ok").inc()
            self.metrics.activation_seconds.labels(runtime.name).observe(elapsed)
            self.events.add("activated", runtime.name, runtime.device, elapsed, reason)
        else:
            self.metrics.activations.labels(runtime.name, "failed").inc()
            self.events.add("activation_failed", runtime.name, runtime.device, elapsed, error)
            runtime.state, runtime.device = ModelState.INACTIVE, None
            if kind != "no_memory":
                runtime.error = error  # a broken model: its requests fail instead of waiting
        runtime.notify()

    # --- eviction ---------------------------------------------------------------------------------

    async def evict(self, model: str, reason: str = "admin", drain_timeout_s: float | None = None) -> dict:
        """Stop routing to `model`, drain its requests (up to the timeout; the rest fail), unload it."""
        runtime = self.runtimes[model]
        async with self._plan_lock:
            if runtime.state is not ModelState.ACTIVE:
                return {"model": model, "state": runtime.state.value}
            runtime.state = ModelState.EVICTING
            runtime.notify()
        return await self._evict_now(runtime, reason, drain_timeout_s)

    async def _evict_now(self, runtime: ModelRuntime, reason: str, drain_timeout_s: float | None = None) -> dict:
        started = time.monotonic()
        drain = self.registry.scheduler.evict_drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        deadline = started + drain
        while runtime.num_running > 0 and time.monotonic() < deadline:
            try:
                await runtime.changed(deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        failed = 0
        worker = self.workers.get(runtime.device)
        if worker is not None:
            try:
                failed = (await worker.evict(runtime.name, reason)).num_failed
            except WorkerGone:
                pass  # the worker died: the model's memory went with it
        elapsed = time.monotonic() - started
        self.events.add("evicted", runtime.name, runtime.device, elapsed, f"{reason}; {failed} request(s) failed" if failed else reason)
        self.metrics.evictions.labels(runtime.name, reason.split(":")[0]).inc()
        self.metrics.eviction_seconds.labels(runtime.name).observe(elapsed)
        runtime.state, runtime.device, runtime.activated_s = ModelState.INACTIVE, None, None
        runtime.notify()
        return {"model": runtime.name, "state": "inactive", "evict_s": elapsed, "failed_requests": failed}

    async def _migrate(self, action: Migrate) -> None:
        runtime = self.runtimes[action.model]
        await self.evict(action.model, f"migration to {action.dst}")
        if runtime.state is ModelState.INACTIVE:
            self._start_activation(runtime, action.dst, f"migration from {action.src}")

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        for runtime in self.runtimes.values():
            if runtime.device == worker.worker_id and runtime.state is not ModelState.INACTIVE:
                self.events.add("worker_exited", runtime.name, worker.worker_id, detail="weights lost; restored when it is back")
                if runtime.state is ModelState.ACTIVE:
                    self.restoring[runtime.name] = worker.worker_id
                runtime.state, runtime.device, runtime.activated_s = ModelState.INACTIVE, None, None
                runtime.notify()

    def _on_worker_ready(self, worker: WorkerHandle) -> None:
        """A restarted worker: bring back the models it held (requests for them are waiting already)."""
        for name, worker_id in list(self.restoring.items()):
            if worker_id == worker.worker_id and name in self.runtimes:
                asyncio.create_task(self._restore(self.runtimes[name], worker_id))

    async def _restore(self, runtime: ModelRuntime, device: str) -> None:
        try:
            if runtime.activating is not None:
                await asyncio.shield(runtime.activating)
            elif runtime.state is ModelState.INACTIVE:
                runtime.activating = asyncio.current_task()
                await self._activate(runtime, device, "restore after worker restart", allow_evictions=False)
        finally:
            self.restoring.pop(runtime.name, None)

    # --- state ------------------------------------------------------------------------------------

    def cluster_state(self) -> ClusterState:
        now = time.monotonic()
        devices = tuple(
            DeviceInfo(worker.worker_id, worker.pool_budget_bytes) for worker in self.workers.values() if worker.pool_budget_bytes
        )
        return ClusterState(devices, tuple(self._model_info(r, now) for r in self.runtimes.values()))

    def _model_info(self, runtime: ModelRuntime, now: float) -> ModelInfo:
        rates = self.rates.rates(now, runtime.name)
        kind = (runtime.device or next(iter(self.workers), "cpu")).split(":")[0]
        slo = runtime.entry.config.slo
        step_s = runtime.weight_bytes / MEMORY_BANDWIDTH[kind]
        stats = self.workers[runtime.device].model_stats(runtime.name) if runtime.device in self.workers else None
        return ModelInfo(
            name=runtime.name,
            weight_bytes=runtime.weight_bytes,
            kv_bytes_per_token=runtime.kv_bytes_per_token,
            tpot_slo_s=slo.tpot_s,
            ttft_slo_s=slo.ttft_s,
            pinned=runtime.pinned,
            device_id=runtime.device,
            state=runtime.state,
            rates=rates,
            compute_share=compute_share(rates, step_s, slo.tpot_s, PREFILL_TOKENS_PER_S[kind]),
            num_inflight=runtime.num_waiting + runtime.num_running,
            kv_bytes_in_use=stats.kv_pages_mapped * self.registry.memory.page_bytes if stats else 0,
            preferred_device=runtime.entry.config.device,
            activated_s=runtime.activated_s,
        )

    def dry_run(self, model: str) -> dict:
        """If `model` were activated now: where, what would be evicted, and about how long it would take."""
        runtime = self.runtimes[model]
        if runtime.state is not ModelState.INACTIVE:
            return {"model": model, "state": runtime.state.value, "device": runtime.device, "evict": [], "estimated_s": 0.0}
        plan = self.global_scheduler.on_arrival(time.monotonic(), model, self.cluster_state(), dry_run=True)
        target = next((a for a in plan if isinstance(a, Activate)), None)
        if target is None:
            return {"model": model, "state": "inactive", "device": None, "evict": [], "estimated_s": None,
                    "detail": "no device can make room now (busy or pinned models); requests would wait"}
        kind = target.device.split(":")[0]
        return {
            "model": model,
            "state": "inactive",
            "device": target.device,
            "evict": [{"model": a.model, "reason": a.reason} for a in plan if isinstance(a, Evict)],
            "estimated_s": runtime.weight_bytes / LOAD_BANDWIDTH[kind],
        }

    def pin(self, model: str, pinned: bool) -> None:
        self.runtimes[model].pinned = pinned

    async def remove(self, model: str) -> None:
        runtime = self.runtimes[model]
        if runtime.state is not ModelState.INACTIVE:
            runtime.pinned = False
            await self.evict(model, "removed", drain_timeout_s=self.registry.scheduler.evict_drain_timeout_s)
        for worker in self.workers.values():
            try:
                await worker.forget(model)
            except WorkerGone:
                pass
        del self.runtimes[model]
        self.rates.forget(model)


def _with(model: ModelInfo, **changes) -> ModelInfo:
    import dataclasses

    return dataclasses.replace(model, **changes)
