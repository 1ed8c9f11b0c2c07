"""Carrying out the global scheduler's decisions: the one place where activations, evictions and
migrations happen, whether a periodic cycle, a request's arrival, the admin API, start-up or a worker's
restart asked for them.

`begin(actions)` is called under the model manager's plan lock and does not wait: it marks every model
an action touches at once (victims EVICTING, activated models ACTIVATING on their device, migrated models
booked on their destination too: `also_on`), so the next decision sees them and memory is never booked
twice; the work itself (drains,
round trips to the workers) then runs in tasks. An activation waits for the evictions that were started
with it on its device.

Every activation ends with one of five outcomes (`ActivationOutcome.kind`):
  * `ok`: the model is resident;
  * `no_memory` (transient): the worker could not back it now; a later decision retries, not before
    `NO_MEMORY_BACKOFF_S`;
  * `worker_lost` (transient): the worker exited or is restarting; its device leaves the cluster state
    until it is back, so requests wait for it instead of retrying;
  * `failed`: the model is broken; its requests fail (503) until an operator changes the model;
  * `cancelled`: it was started for requests that all left while it waited for the model's preparation,
    and withdrawn (`cancel_if_unwanted`); the model stays prepared, inactive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

from controller.events import EventLog
from controller.metrics import Metrics
from controller.registry import Registry
from controller.runtime import ModelRuntime
from controller.worker_handle import WorkerGone, WorkerHandle
from scheduler.cluster import Action, Activate, Evict, Migrate, ModelState
from workers.contract import messages as m

logger = logging.getLogger("prism.controller")

NO_MEMORY_BACKOFF_S = 0.5

OutcomeKind = Literal["ok", "no_memory", "worker_lost", "failed", "cancelled"]


@dataclass(frozen=True)
class ActivationOutcome:
    kind: OutcomeKind
    error: str | None = None
    reply: m.ModelActivated | None = None


class ActionExecutor:
    def __init__(self, registry: Registry, runtimes: dict[str, ModelRuntime], workers: dict[str, WorkerHandle],
                 metrics: Metrics, events: EventLog):
        self.registry = registry
        self.runtimes = runtimes
        self.workers = workers
        self.metrics = metrics
        self.events = events

    def begin(self, actions: list[Action], reason: str, drain_timeout_s: float | None = None) -> list[asyncio.Task]:
        """Mark the actions' models and start the work; the tasks return what each action did."""
        evictions: dict[str, list[asyncio.Task]] = {}
        tasks = []
        for action in sorted(actions, key=lambda a: not isinstance(a, Evict)):  # victims first
            runtime = self.runtimes.get(action.model)
            if runtime is None:
                continue  # removed since the decision
            if isinstance(action, Evict) and runtime.state is ModelState.ACTIVE and runtime.also_on is None:
                runtime.set_state(ModelState.EVICTING)
                task = asyncio.create_task(self._evict(runtime, action.reason, drain_timeout_s))
                evictions.setdefault(runtime.device, []).append(task)
            elif isinstance(action, Activate) and runtime.state is ModelState.INACTIVE:
                runtime.set_state(ModelState.ACTIVATING, action.device)
                runtime.kv_budget_bytes = action.kv_budget_bytes
                runtime.activation_reason = reason
                task = asyncio.create_task(self._activate(runtime, evictions.get(action.device, []), reason))
            elif isinstance(action, Migrate) and runtime.state is ModelState.ACTIVE and runtime.also_on is None:
                runtime.also_on = action.dst  # booked there from now on; it keeps serving on its source
                task = asyncio.create_task(self._migrate(runtime, action))
            else:
                continue  # the state moved on since the decision: it is decided again with the next one
            runtime.task = task
            tasks.append(task)
        return tasks

    # --- activation -------------------------------------------------------------------------------

    async def _activate(self, runtime: ModelRuntime, after: list[asyncio.Task], reason: str) -> ActivationOutcome:
        started = time.monotonic()
        if after:
            await asyncio.gather(*after, return_exceptions=True)
        try:
            outcome = await self._load(runtime)
        except Exception as exc:  # a defect here must not leave the model activating for ever
            logger.exception("activating %s failed in the controller", runtime.name)
            outcome = ActivationOutcome("failed", f"{type(exc).__name__}: {exc}")
        self._record_activation(runtime, outcome, time.monotonic() - started, reason)
        return outcome

    async def _load(self, runtime: ModelRuntime) -> ActivationOutcome:
        worker = self.workers.get(runtime.device)
        if worker is None:
            return ActivationOutcome("worker_lost", f"worker {runtime.device} left")
        return await self._load_on(runtime, worker)

    def _record_activation(self, runtime: ModelRuntime, outcome: ActivationOutcome, elapsed: float, reason: str) -> None:
        device = runtime.device
        if outcome.kind == "ok":
            reply = outcome.reply
            runtime.activated_s = time.monotonic()
            runtime.last_activation = {"total_s": elapsed, "worker_s": reply.total_s, "stage_s": reply.stage_s,
                                       "map_copy_s": reply.map_copy_s, "build_s": reply.build_s,
                                       "graphs_captured": reply.graphs_captured}
            self.metrics.activations.labels(runtime.name, "ok").inc()
            self.metrics.activation_seconds.labels(runtime.name).observe(elapsed)
            self.events.add("activated", runtime.name, device, elapsed, reason)
            runtime.set_state(ModelState.ACTIVE)
            return
        self.metrics.activations.labels(runtime.name, outcome.kind).inc()
        if outcome.kind == "cancelled":
            self.events.add("activation_cancelled", runtime.name, device, elapsed, "no request waits for it")
            runtime.set_state(ModelState.INACTIVE, None)
            return
        self.events.add("activation_failed", runtime.name, device, elapsed, f"{outcome.kind}: {outcome.error}")
        if outcome.kind == "failed":
            runtime.error = outcome.error  # a broken model: its requests fail instead of waiting
        elif outcome.kind == "no_memory":
            runtime.retry_after_s = time.monotonic() + NO_MEMORY_BACKOFF_S
        runtime.set_state(ModelState.INACTIVE, None)

    def cancel_if_unwanted(self, runtime: ModelRuntime) -> None:
        """The last request waiting for `runtime` left: withdraw its activation if only requests asked for
        it (not the scheduler, an operator, start-up or a restore) and the worker is still preparing it."""
        if runtime.state is ModelState.ACTIVATING and runtime.num_waiting == 0 and runtime.activation_reason == "request":
            worker = self.workers.get(runtime.device)
            if worker is not None:
                worker.cancel_activation(runtime.name)

    # --- eviction and migration -------------------------------------------------------------------

    async def _evict(self, runtime: ModelRuntime, reason: str, drain_timeout_s: float | None = None) -> dict:
        """Drain the model's requests (up to the timeout; the rest fail), then unload it from its worker."""
        started = time.monotonic()
        drain = self.registry.scheduler.evict_drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        deadline = started + drain
        while runtime.num_running > 0 and time.monotonic() < deadline:
            try:
                await runtime.changed(deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        worker = self.workers.get(runtime.device)
        failed = await self._evict_from(worker, runtime.name, reason) if worker is not None else 0
        elapsed = time.monotonic() - started
        self.events.add("evicted", runtime.name, runtime.device, elapsed, f"{reason}; {failed} request(s) failed" if failed else reason)
        self.metrics.evictions.labels(runtime.name, reason.split(":")[0]).inc()
        self.metrics.eviction_seconds.labels(runtime.name).observe(elapsed)
        runtime.activated_s = None
        runtime.set_state(ModelState.INACTIVE, None)
        return {"model": runtime.name, "state": "inactive", "evict_s": elapsed, "failed_requests": failed}

    async def _migrate(self, runtime: ModelRuntime, action: Migrate) -> dict:
        """Make before break: load the model on `dst` while `src` keeps serving it, switch new requests to
        `dst`, let those on `src` finish (up to the drain timeout), then evict it there. No request fails
        because of a migration that completes within the drain timeout; one that `dst` cannot take leaves
        the model where it was."""
        started = time.monotonic()
        source, destination = self.workers.get(action.src), self.workers.get(action.dst)
        try:
            if destination is None or source is None:
                outcome = ActivationOutcome("failed", f"unknown device {action.dst if destination is None else action.src}")
            else:
                outcome = await self._load_on(runtime, destination)
            if outcome.kind != "ok" or runtime.state is not ModelState.ACTIVE or runtime.device != action.src:
                self.events.add("migration_failed", runtime.name, action.dst, time.monotonic() - started,
                                f"{outcome.kind}: {outcome.error}" if outcome.kind != "ok" else "the model moved on meanwhile")
                if outcome.kind == "ok" and destination is not None:
                    await self._evict_from(destination, runtime.name, "migration abandoned")
                return {"model": runtime.name, "state": runtime.state.value, "device": runtime.device, "migrated": False,
                        "error": outcome.error or "the model moved on meanwhile"}
            runtime.also_on = action.src  # draining there; new requests go to the destination from now on
            runtime.activated_s = time.monotonic()
            runtime.set_state(ModelState.ACTIVE, action.dst)
            switched_s = time.monotonic() - started
            failed = await self._drain_and_evict(runtime, source, f"migrated to {action.dst}")
        finally:
            runtime.also_on = None
            runtime.notify()
        elapsed = time.monotonic() - started
        self.events.add("migrated", runtime.name, action.dst, elapsed,
                        f"from {action.src}; switched after {switched_s:.3f} s" + (f"; {failed} request(s) failed" if failed else ""))
        return {"model": runtime.name, "state": runtime.state.value, "device": action.dst, "migrated": True,
                "switch_s": switched_s, "migrate_s": elapsed, "failed_requests": failed}

    async def _load_on(self, runtime: ModelRuntime, worker: WorkerHandle) -> ActivationOutcome:
        spec = runtime.entry.spec(worker.device, self.registry.memory.block_size)
        try:
            reply = await worker.activate(spec, runtime.kv_budget_bytes)
        except WorkerGone as exc:
            return ActivationOutcome("worker_lost", str(exc))
        if reply.error is not None:
            return ActivationOutcome(reply.error_kind or "failed", reply.error, reply)
        return ActivationOutcome("ok", None, reply)

    async def _drain_and_evict(self, runtime: ModelRuntime, worker: WorkerHandle, reason: str) -> int:
        """Wait until none of the model's requests runs on `worker` (up to the drain timeout), then evict it
        there; how many requests the eviction failed."""
        deadline = time.monotonic() + self.registry.scheduler.evict_drain_timeout_s
        while worker.num_streams(runtime.name) > 0 and time.monotonic() < deadline:
            try:
                await runtime.changed(deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        return await self._evict_from(worker, runtime.name, reason)

    @staticmethod
    async def _evict_from(worker: WorkerHandle, name: str, reason: str) -> int:
        try:
            return (await worker.evict(name, reason)).num_failed
        except WorkerGone:
            return 0  # the worker died: the model's memory went with it
