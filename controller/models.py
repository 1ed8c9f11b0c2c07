"""The model manager: the registry's models as the controller sees them, and the decisions about them.

Every registry model has one runtime (`controller/runtime.py`: inactive -> activating -> active ->
evicting -> inactive, a device, its request counts); `runtimes` is the controller's one table of models.
A request for a model that is not active waits here (its wait counts in its TTFT). Decisions come from
the global scheduler (scheduler/placement.py): on a request's arrival, in a periodic cycle (pending
activations, evictions under memory pressure, idle evictions, at most one migration), at start-up and
from the admin API; the action executor (`controller/executor.py`) carries every one of them out.

What the controller believes a worker holds is checked against each of that worker's heartbeats: a
model the controller thinks active there that the worker does not hold is marked inactive (its next
request activates it again), and a model the worker holds that the controller does not place there is
evicted; both are logged as errors and recorded as `residency_repaired` events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from controller.catalog import CatalogEntry
from controller.errors import Unavailable
from controller.events import EventLog
from controller.executor import ActionExecutor
from controller.metrics import Metrics
from controller.registry import Registry
from controller.runtime import ModelRuntime
from controller.worker_handle import WorkerGone, WorkerHandle
from scheduler.cluster import Action, Activate, ClusterState, DeviceInfo, Evict, Migrate, ModelInfo, ModelState
from scheduler.placement import GlobalScheduler
from scheduler.pressure import compute_share
from scheduler.rates import RateTracker
from workers.contract import messages as m
from workers.contract.sizing import mapped_bytes

logger = logging.getLogger("prism.controller")

CYCLE_S = 0.5
STARTUP_TIMEOUT_S = 600.0  # a worker's first start (imports, CUDA init, page creation)
# Rough device speeds for the scheduler's compute term (a decode step reads the weights once).
MEMORY_BANDWIDTH = {"cpu": 2e10, "cuda": 3e12}
PREFILL_TOKENS_PER_S = {"cpu": 500.0, "cuda": 20000.0}
LOAD_BANDWIDTH = {"cpu": 2e9, "cuda": 5e10}


class ModelManager:
    def __init__(self, registry: Registry, catalog: dict[str, CatalogEntry], workers: dict[str, WorkerHandle],
                 metrics: Metrics, events: EventLog):
        self.registry = registry
        self.workers = workers
        self.metrics = metrics
        self.events = events
        sched = registry.scheduler
        self.rates = RateTracker(window_s=sched.rate_window_s)
        kinds = {w.kind for w in workers.values()} or {"cpu"}
        self.global_scheduler = GlobalScheduler(sched.policy, sched.placement(min(LOAD_BANDWIDTH[k] for k in kinds)))
        self.runtimes: dict[str, ModelRuntime] = {}
        for entry in catalog.values():
            self.add(entry)
        self.executor = ActionExecutor(registry, self.runtimes, workers, metrics, events)
        self._plan_lock = asyncio.Lock()  # one placement decision at a time: memory is never double-booked
        self._cycle: asyncio.Task | None = None
        self.restoring: dict[str, str] = {}  # model -> worker id: resident there when the worker died
        for worker in workers.values():
            self.adopt(worker)

    # --- the table of models ----------------------------------------------------------------------

    def add(self, entry: CatalogEntry) -> ModelRuntime:
        size = entry.size(self._any_device())
        runtime = ModelRuntime(entry, size.weight_bytes, size.kv_bytes_per_token, entry.config.pinned)
        self.runtimes[entry.name] = runtime
        for worker in self.workers.values():
            self._prepare(worker, runtime)
        return runtime

    def _prepare(self, worker: WorkerHandle, runtime: ModelRuntime) -> None:
        """Have `worker` prepare the model in the background, if the model may be placed there."""
        preferred = runtime.entry.config.device
        if worker.state == "ready" and preferred in (None, worker.worker_id):
            worker.prepare(runtime.entry.spec(worker.device, self.registry.memory.block_size))

    def preparation(self, name: str) -> dict[str, str]:
        """Per device, where the model stands in its preparation (from the workers' heartbeats)."""
        states = {}
        for device, worker in self.workers.items():
            stats = worker.model_stats(name) if worker.state == "ready" else None
            if stats is not None:
                states[device] = stats.preparation
        return states

    def entry(self, name: str) -> CatalogEntry | None:
        runtime = self.runtimes.get(name)
        return runtime.entry if runtime is not None else None

    @property
    def entries(self) -> dict[str, CatalogEntry]:
        return {name: runtime.entry for name, runtime in self.runtimes.items()}

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.runtimes.values())

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Activate pinned models, then the others in registry order while they fit without evicting."""
        for worker in list(self.workers.values()):  # workers may join meanwhile
            await worker.wait_ready(STARTUP_TIMEOUT_S)
        await self._place_at_start("startup")
        self._cycle = asyncio.create_task(self._run_cycles(), name="placement-cycle")

    async def _place_at_start(self, reason: str) -> None:
        for runtime in sorted(self.runtimes.values(), key=lambda r: not r.pinned):
            if runtime.state is not ModelState.INACTIVE:
                continue
            if self.global_scheduler.policy.name != "prism" and not runtime.pinned:
                continue  # the baselines decide themselves (static: all at once in its first cycle)
            allow_evictions = runtime.pinned
            await self._decide(lambda state, name=runtime.name: self._arrival(name, state, allow_evictions), reason, wait=True)

    async def stop(self) -> None:
        if self._cycle is not None:
            self._cycle.cancel()
        for runtime in self.runtimes.values():
            if runtime.task is not None:
                runtime.task.cancel()

    async def _run_cycles(self) -> None:
        while True:
            await asyncio.sleep(CYCLE_S)
            try:
                await self.cycle()
            except Exception:  # a failed cycle must not stop placement; the next one retries
                logger.exception("placement cycle failed")

    async def cycle(self) -> None:
        """One periodic decision: pending activations, evictions, at most one migration."""
        await self._decide(lambda state: self.global_scheduler.plan(time.monotonic(), state), "scheduler")

    async def _decide(self, decide: Callable[[ClusterState], list[Action]], reason: str, wait: bool = False,
                      drain_timeout_s: float | None = None) -> list:
        """Ask for actions against the current state and start them, as one step; with `wait`, their results."""
        async with self._plan_lock:
            tasks = self.executor.begin(decide(self.cluster_state()), reason, drain_timeout_s)
        return await asyncio.gather(*tasks) if wait else []

    def _arrival(self, name: str, state: ClusterState, allow_evictions: bool = True) -> list[Action]:
        actions = self.global_scheduler.on_arrival(time.monotonic(), name, state)
        if not allow_evictions and any(isinstance(a, Evict) for a in actions):
            return []
        return actions

    # --- requests ---------------------------------------------------------------------------------

    async def acquire(self, model: str, num_prompt_tokens: int, timeout_s: float) -> WorkerHandle:
        """The worker of an active `model`, activating it first if needed; the caller must `release`."""
        runtime = self.runtimes[model]
        self.rates.on_request(time.monotonic(), model, num_prompt_tokens)
        arrived = time.monotonic()
        runtime.waiting_since.append(arrived)
        deadline = arrived + timeout_s
        try:
            while True:
                worker = self.workers.get(runtime.device) if runtime.state is ModelState.ACTIVE else None
                if worker is not None and worker.state == "ready":
                    runtime.num_running += 1
                    return worker
                if runtime.error is not None:
                    raise Unavailable(f"model {model!r} cannot be activated: {runtime.error}", retry_after_s=30)
                if runtime.state is ModelState.INACTIVE and time.monotonic() >= runtime.retry_after_s:
                    await self._decide(lambda state: self._arrival(model, state), "request")
                if runtime.state is ModelState.INACTIVE and self.global_scheduler.unplaced(model):
                    raise Unavailable(f"model {model!r} is not served: static partitioning gave every device's memory to the "
                                      "models that fit (scheduler.policy: static)", retry_after_s=60)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(f"model {model!r} is not available yet ({runtime.state.value}); retry later", retry_after_s=5)
                try:
                    await runtime.changed(min(remaining, CYCLE_S * 4))
                except asyncio.TimeoutError:
                    pass  # re-check: a cycle may have found room meanwhile
        finally:
            runtime.waiting_since.remove(arrived)
            if runtime.num_waiting == 0:
                self.executor.cancel_if_unwanted(runtime)

    def release(self, model: str, num_generated: int) -> None:
        runtime = self.runtimes.get(model)
        if runtime is None:
            return
        runtime.num_running -= 1
        self.rates.on_decode(time.monotonic(), model, num_generated)
        runtime.notify()  # an eviction or a migration's source may be draining

    def not_resident(self, model: str, worker_id: str) -> None:
        """The worker refused a request because it does not hold `model`: repair the controller's view."""
        runtime = self.runtimes.get(model)
        if runtime is not None and runtime.state is ModelState.ACTIVE and runtime.device == worker_id:
            self._repair(runtime, worker_id, "the worker refused a request for it as not resident")

    # --- admin ------------------------------------------------------------------------------------

    async def activate(self, model: str, device: str | None = None) -> dict:
        """Admin: activate now (optionally on `device`), evicting idle models if needed."""
        runtime = self.runtimes[model]
        if runtime.state is ModelState.ACTIVE:
            return {"model": model, "state": "active", "device": runtime.device}
        if runtime.state is ModelState.INACTIVE:
            runtime.error = None
            await self._decide(lambda state: self._plan_activation(model, device, state), "admin", wait=True)
        elif runtime.task is not None:
            await asyncio.shield(runtime.task)
        if runtime.state is not ModelState.ACTIVE:
            raise Unavailable(f"model {model!r} could not be activated: {runtime.error or 'no room on any device now'}", retry_after_s=5)
        return {"model": model, "state": "active", "device": runtime.device, "times": runtime.last_activation}

    def _plan_activation(self, model: str, device: str | None, state: ClusterState) -> list[Action]:
        if device is None:
            return self._arrival(model, state)
        # A device chosen by the operator: plan as if the model preferred it and only that device existed.
        only = ClusterState(
            tuple(d for d in state.devices if d.device_id == device),
            tuple(m if m.name != model else dataclasses.replace(m, preferred_device=device) for m in state.models),
        )
        if not only.devices:
            raise Unavailable(f"no worker on device {device!r} is ready")
        return self.global_scheduler.on_arrival(time.monotonic(), model, only)

    async def migrate(self, model: str, device: str) -> dict:
        """Admin: move an active model to `device`, make before break (its requests keep being served); it
        then cools down like a migration the scheduler made."""
        runtime = self.runtimes[model]
        if runtime.state is not ModelState.ACTIVE or runtime.also_on is not None:
            raise Unavailable(f"model {model!r} is {'migrating' if runtime.also_on else runtime.state.value}; only an active "
                              "model that is not migrating can be migrated", retry_after_s=5)
        if runtime.device == device:
            return {"model": model, "state": "active", "device": device, "migrated": False}
        self.global_scheduler.history.last_moved_s[model] = time.monotonic()
        results = await self._decide(lambda state: [Migrate(model, runtime.device, device)], "admin", wait=True)
        result = results[0] if results else {"migrated": False, "error": "the model moved on meanwhile"}
        if not result["migrated"]:
            raise Unavailable(f"model {model!r} could not be migrated to {device}: {result['error']}", retry_after_s=5)
        return result

    async def evict(self, model: str, reason: str = "admin", drain_timeout_s: float | None = None) -> dict:
        """Stop routing to `model`, drain its requests (up to the timeout; the rest fail), unload it."""
        runtime = self.runtimes[model]
        if runtime.state is not ModelState.ACTIVE:
            return {"model": model, "state": runtime.state.value}
        results = await self._decide(lambda state: [Evict(model, runtime.device, reason)], reason, wait=True,
                                     drain_timeout_s=drain_timeout_s)
        return results[0] if results else {"model": model, "state": runtime.state.value}

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
        kind = self.workers[target.device].kind
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
        runtime.pinned = False
        if runtime.task is not None:
            await asyncio.gather(asyncio.shield(runtime.task), return_exceptions=True)
        await self.evict(model, "removed")
        for worker in list(self.workers.values()):
            try:
                await worker.forget(model)
            except WorkerGone:
                pass
        del self.runtimes[model]
        self.rates.forget(model)

    # --- workers ----------------------------------------------------------------------------------

    def adopt(self, worker: WorkerHandle) -> None:
        """Take `worker` into placement: its device counts from its first WorkerReady on."""
        worker.on_exit = self._on_worker_exit
        worker.on_ready = self._on_worker_ready
        worker.on_heartbeat = self._reconcile

    def forget_worker(self, worker: WorkerHandle) -> None:
        """A worker left for good (it had joined over the network): the models it held are placed on the
        other devices now, as if requested, instead of waiting for it to come back."""
        lost = [name for name, wid in self.restoring.items() if wid == worker.worker_id]
        for name in lost:
            del self.restoring[name]
        for name in lost:
            if name in self.runtimes:
                asyncio.get_running_loop().create_task(
                    self._decide(lambda state, name=name: self._arrival(name, state), f"{worker.worker_id} left", wait=True))

    def _any_device(self) -> str:
        """A device for sizes that depend only on its kind (any worker's; the CPU while none has joined)."""
        return next((w.device for w in self.workers.values()), "cpu")

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        for runtime in self.runtimes.values():
            if runtime.device == worker.worker_id and runtime.state is not ModelState.INACTIVE:
                self.events.add("worker_exited", runtime.name, worker.worker_id, detail="weights lost; restored when it is back")
                if runtime.state is ModelState.ACTIVE:
                    self.restoring[runtime.name] = worker.worker_id
                runtime.activated_s = None
                runtime.set_state(ModelState.INACTIVE, None)

    def _on_worker_ready(self, worker: WorkerHandle) -> None:
        """A (re)started worker: bring back the models it held, have it prepare every model it may host
        (the likeliest needed first: pinned, then by request rate, then in registry order), and wake the
        requests waiting for a device."""
        restore = [name for name, wid in self.restoring.items() if wid == worker.worker_id and name in self.runtimes]
        if restore:
            asyncio.create_task(self._restore(restore, worker.worker_id))
        elif worker.remote and self._cycle is not None:  # a device joined a running cluster: place what start-up would
            asyncio.create_task(self._place_at_start(f"{worker.worker_id} joined"))
        now = time.monotonic()
        order = sorted(self.runtimes.values(), key=lambda r: (not r.pinned, -self.rates.rates(now, r.name).request_rate))
        for runtime in order:
            self._prepare(worker, runtime)
        for runtime in self.runtimes.values():
            runtime.notify()

    async def _restore(self, names: list[str], device: str) -> None:
        def restore(state: ClusterState) -> list[Action]:
            return [Activate(n, device, self.runtimes[n].kv_budget_bytes) for n in names if self.runtimes[n].state is ModelState.INACTIVE]

        try:
            await self._decide(restore, "restore after worker restart", wait=True)
        finally:
            for name in names:
                self.restoring.pop(name, None)

    def _reconcile(self, worker: WorkerHandle, beat: m.Heartbeat) -> None:
        """Compare the controller's view of `worker` with what it reports holding; repair disagreements.
        Models with an action in flight are skipped: the worker's reply, which follows its state, settles them."""
        held = {s.name for s in beat.models if s.resident}
        for runtime in self.runtimes.values():
            here = runtime.device == worker.worker_id or runtime.also_on == worker.worker_id  # a migration's two devices
            if runtime.state is ModelState.ACTIVE and runtime.device == worker.worker_id and runtime.name not in held:
                self._repair(runtime, worker.worker_id, "the worker's heartbeat does not list it")
            elif runtime.name in held and not here and runtime.state in (ModelState.ACTIVE, ModelState.INACTIVE):
                logger.error("residency: worker %s holds %s, which the controller places %s; evicting it there",
                             worker.worker_id, runtime.name, runtime.device or "nowhere")
                self.events.add("residency_repaired", runtime.name, worker.worker_id, detail="held by a worker that should not: evicted")
                asyncio.create_task(self._evict_stray(worker, runtime.name))

    def _repair(self, runtime: ModelRuntime, worker_id: str, why: str) -> None:
        logger.error("residency: %s is active on %s in the controller's view, but %s; marking it inactive", runtime.name, worker_id, why)
        self.events.add("residency_repaired", runtime.name, worker_id, detail=f"{why}: marked inactive")
        runtime.activated_s = None
        runtime.set_state(ModelState.INACTIVE, None)

    @staticmethod
    async def _evict_stray(worker: WorkerHandle, name: str) -> None:
        try:
            await worker.evict(name, "not placed on this worker")
        except WorkerGone:
            pass

    # --- state ------------------------------------------------------------------------------------

    def cluster_state(self) -> ClusterState:
        """The scheduler's input: the devices of ready workers, and every model."""
        now = time.monotonic()
        devices = tuple(
            DeviceInfo(w.worker_id, w.pool_budget_bytes) for w in self.workers.values() if w.state == "ready" and w.pool_budget_bytes
        )
        return ClusterState(devices, tuple(self._model_info(r, now) for r in self.runtimes.values()))

    def _model_info(self, runtime: ModelRuntime, now: float) -> ModelInfo:
        rates = self.rates.rates(now, runtime.name)
        worker = self.workers.get(runtime.device) if runtime.device else None
        kind = (worker.device if worker is not None else self._any_device()).split(":")[0]
        slo = runtime.entry.config.slo
        step_s = runtime.weight_bytes / MEMORY_BANDWIDTH[kind]
        stats = self.workers[runtime.device].model_stats(runtime.name) if runtime.device in self.workers else None
        return ModelInfo(
            name=runtime.name,
            # In whole pages, as the pool maps them: three 12.3 MiB models "fit" 40 MiB in bytes, not in 2 MiB
            # pages (7 each), and the activation failed for no memory every half second, never evicting.
            weight_bytes=mapped_bytes(runtime.weight_bytes, self.registry.memory.page_bytes),
            kv_bytes_per_token=runtime.kv_bytes_per_token,
            tpot_slo_s=slo.tpot_s,
            ttft_slo_s=slo.ttft_s,
            pinned=runtime.pinned,
            device_id=runtime.device,
            state=runtime.state,
            rates=rates,
            compute_share=compute_share(rates, step_s, slo.tpot_s, PREFILL_TOKENS_PER_S[kind]),
            num_inflight=runtime.num_in_flight,
            kv_bytes_in_use=stats.kv_pages_mapped * self.registry.memory.page_bytes if stats else 0,
            preferred_device=runtime.entry.config.device,
            activated_s=runtime.activated_s,
            also_on=runtime.also_on,
            waiting_s=time.monotonic() - runtime.waiting_since[0] if runtime.waiting_since else 0.0,
        )
