"""One device's models and their loop, without a socket: messages in, messages out.

The worker process (`worker.py`) feeds it what arrives on its channel and sends what it produces; the
offline runner (`offline.py`) and the tests drive the same object directly. One turn of the loop is:
handle the inbox (`handle`), run the step the local scheduler plans (`step`: one model's step is launched
while the one before it finishes, `step_loop.py`), and now and then report (`report`: trim idle KV pages,
top up the pool's reserve, a `Heartbeat`).

Preparation never blocks the loop: a model's engine is built at once (address ranges only), its module
and host image are prepared on a staging thread (`Engine.prepare`), and an activation that arrives before
its model is prepared waits for that without holding up the resident models' steps; several models stage
at once. An image found in the store rather than built here (a restarted worker's, another worker's) is
pinned on a thread of its own afterwards; an activation meanwhile copies its unpinned part through bounce
buffers. On a GPU, CUDA graphs are captured while the device is idle (no step queued, no staging or
pinning thread running: a capture must be the only CUDA work in the process): a prepared model's ahead of
its activation, so that the activation is map + copy. An activation never captures: a model activated
before its graphs were captured runs eager until the device is idle, or until it has run eager for
GRAPHS_DUE_S, when its graphs are captured between two steps.

Residency has one owner here: a model is resident on this device exactly when the local scheduler has
its queue (`is_resident`). Engines outlive residency (an evicted model's engine keeps its address ranges
and graphs for the next activation), so an engine existing says nothing about residency. Whatever goes
wrong with one request (bad input, an engine error) finishes that request with an error delta; the loop
keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from memory import PagePool
from memory.host_store import HostWeightStore
from scheduler.local import LocalScheduler
from scheduler.sequence import Sequence
from workers.contract import messages as m
from workers.contract.gc_heap import collect_frozen, freeze_heap
from workers.engine.engine import Engine, NotEnoughMemory
from workers.step_loop import StepCounts, StepLoop, StepOutcome, model_queue

logger = logging.getLogger("prism.worker")

STAGING_THREADS = 2  # host images filled at once: enough to overlap disk or device work with a copy
GRAPHS_DUE_S = 5.0  # an active model runs eager at most this long under load before its graphs are captured
IDLE_BEFORE_CAPTURE_S = 0.5  # a capture (0.5-1.2 s, the loop stopped) or a heap freeze (two full collections) waits
# for this much idleness: not for a request that arrives just after an activation's reply (a restore's captures
# held first tokens back 1-3 s; a freeze run at the first idle turn held every cold request's first token back)


class DeviceLoop:
    def __init__(self, worker_id: str, device: str, pool: PagePool, store: HostWeightStore | None, *,
                 local_policy: str, tpot_target: str, overlap_steps: bool,
                 gc_stats: Callable[[], m.GcStats] | None = None, idle_before_capture_s: float = IDLE_BEFORE_CAPTURE_S):
        self.worker_id = worker_id
        self.device = torch.device(device)
        self.pool = pool
        self.store = store
        self.scheduler = LocalScheduler(local_policy, tpot_target=tpot_target)
        self.engines: dict[str, Engine] = {}  # built once per model; resident or not (see is_resident)
        self.steps = StepLoop(self.scheduler, self.engines, overlap_steps)
        self.gc_stats = gc_stats
        self.stopping = False
        self.outbox: list[m.FromWorker] = []
        self._staging_threads = ThreadPoolExecutor(STAGING_THREADS, thread_name_prefix="staging")
        self._staging: dict[str, Future] = {}  # model -> its preparation, queued or on a staging thread
        self._stage_queue: list[str] = []  # models waiting for a staging thread, in order of asking
        self._stage_lock = threading.Lock()
        self._pin_thread = ThreadPoolExecutor(1, thread_name_prefix="pinning")
        self._pinning: dict[str, Future] = {}  # model -> its image being pinned
        self._eager_since: dict[str, float] = {}  # active models without graphs yet: since when
        self._idle_since: float | None = None  # no step queued and no activation waiting since then
        # Not before then: a model just captured ahead is "prepared" now, and a request for it is likely on its
        # way (a freeze at the next idle turn held such requests' first tokens back by up to 0.2 s on an H100).
        self._freeze_not_before = 0.0
        self._graph_pages: dict[str, int] = {}  # model -> pages taken off the pool's budget for its graphs' memory
        self.idle_before_capture_s = idle_before_capture_s
        self._failed: dict[str, str] = {}  # model -> why its last preparation failed
        self._activations: dict[str, tuple[float, int | None]] = {}  # waiting for their preparation: asked at, KV cap
        self._freeze_when_idle = False
        self._handlers = {
            m.Prepare: self._on_prepare,
            m.Activate: self._on_activate,
            m.CancelActivation: self._on_cancel_activation,
            m.Evict: self._on_evict,
            m.Forget: self._on_forget,
            m.Generate: self._on_generate,
            m.Abort: self._on_abort,
            m.Shutdown: self._on_shutdown,
        }

    # --- the loop's three calls -------------------------------------------------------------------

    def handle(self, message: m.ToWorker) -> None:
        if not isinstance(message, m.Generate):  # may free or unmap memory a running step uses
            self.finish_running_step()
        self._handlers[type(message)](message)

    def step(self) -> None:
        self._finish_preparations()
        for outcome in self.steps.advance():
            self._publish(outcome)
        self._capture_graphs()
        if self._freeze_when_idle and self._idle_for(self.idle_before_capture_s) and time.perf_counter() >= self._freeze_not_before:
            self._freeze_when_idle = False  # off every request's path (as far as idleness can tell)
            logger.info("after activations: %s", freeze_heap().describe())

    def _idle_for(self, seconds: float) -> bool:
        """No step queued and no activation waiting for at least `seconds` (as of the last `_capture_graphs`)."""
        return self._idle_since is not None and time.perf_counter() - self._idle_since >= seconds

    def report(self) -> None:
        """Give idle KV pages back, top up the pool's reserve, and send the state (a heartbeat)."""
        self.finish_running_step()  # trimming unmaps pages: not under a running kernel
        for name, queue in self.scheduler.queues.items():
            self.engines[name].kv.trim_idle(bool(queue.running or queue.waiting))
        self.pool.replenish_reserve()
        self._send_state()

    # --- state ------------------------------------------------------------------------------------

    def is_resident(self, name: str) -> bool:
        return name in self.scheduler.queues

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def poll_timeout_ms(self) -> int:
        """How long the worker may wait for its inbox: not at all with steps to run, briefly while
        preparations are under way (an activation may be waiting for one), else a while."""
        if self.scheduler.has_work():
            return 0
        return 5 if self._staging or self._activations else 50

    def take_outbox(self) -> list[m.FromWorker]:
        outbox, self.outbox = self.outbox, []
        return outbox

    def settle(self) -> None:
        """Wait for every preparation under way and finish the activations waiting for them (for callers
        that drive the loop by hand: the offline runner, tests)."""
        while self._staging or self._pinning:
            for future in [*self._staging.values(), *self._pinning.values()]:
                future.exception()
            while any(f.done() for f in [*self._staging.values(), *self._pinning.values()]):
                self._finish_preparations()

    def finish_running_step(self) -> None:
        for outcome in self.steps.drain():
            self._publish(outcome)

    def close(self) -> None:
        """Stop: requests still unfinished fail ("the worker is shutting down"), every model is unloaded."""
        self.finish_running_step()
        for name in list(self.scheduler.queues):
            self._evict(name, "the worker is shutting down")
        self._staging_threads.shutdown(wait=True, cancel_futures=True)  # no thread may fill into a closed image
        self._pin_thread.shutdown(wait=True, cancel_futures=True)
        for engine in self.engines.values():
            engine.close()
        if self.store is not None:
            self.store.drop_all()

    # --- handlers ---------------------------------------------------------------------------------

    def _on_prepare(self, message: m.Prepare) -> None:
        self._stage(self._engine_for(message.spec))

    def _on_activate(self, message: m.Activate) -> None:
        spec = message.spec
        if self.is_resident(spec.name):
            self._send_state()
            self.outbox.append(self._activated(self.engines[spec.name]))
            return
        try:
            engine = self._engine_for(spec)
        except Exception as exc:  # a spec the engine cannot take: the model is broken
            logger.error("building the engine of %s failed:\n%s", spec.name, traceback.format_exc())
            self._send_state()
            self.outbox.append(m.ModelActivated(spec.name, f"{type(exc).__name__}: {exc}", "failed"))
            return
        self._activations[spec.name] = (time.perf_counter(), message.kv_budget_bytes)
        if engine.prepared:
            self._finish_activation(engine)
        else:
            self._stage(engine)

    def _on_cancel_activation(self, message: m.CancelActivation) -> None:
        """Withdraw an activation still waiting for its preparation; the preparation itself goes on."""
        if self._activations.pop(message.name, None) is not None:
            logger.info("activation of %s cancelled: no request waits for it", message.name)
            self._send_state()
            self.outbox.append(m.ModelActivated(message.name, "cancelled: no request waits for it", "cancelled"))

    def _engine_for(self, spec: m.ModelSpec) -> Engine:
        """The model's engine, built now if it has none (or the model was updated: rebuilt)."""
        engine = self.engines.get(spec.name)
        if engine is not None and engine.spec != spec and not self.is_resident(spec.name):
            changed = [f for f in spec.__struct_fields__ if getattr(spec, f) != getattr(engine.spec, f)]
            logger.info("the spec of %s changed (%s): its engine is built again", spec.name, ", ".join(changed))
            self._forget(spec.name)
            engine = None
        if engine is None:
            engine = self.engines[spec.name] = Engine(spec, self.device, self.pool, self.store)
            self._failed.pop(spec.name, None)
        return engine

    def _stage(self, engine: Engine) -> None:
        name = engine.spec.name
        if name not in self._staging and not engine.prepared:
            self._failed.pop(name, None)
            self._staging[name] = Future()
            with self._stage_lock:
                self._stage_queue.append(name)
            self._staging_threads.submit(self._stage_next)

    def _stage_next(self) -> None:
        """On a staging thread: prepare the next queued model, one that an activation waits for first (a
        restarted worker's restore activations went behind every Prepare sent to it before them)."""
        with self._stage_lock:
            if not self._stage_queue:
                return  # forgotten while queued
            waited_for = [name for name in self._stage_queue if name in self._activations]
            name = (waited_for or self._stage_queue)[0]
            self._stage_queue.remove(name)
            future, engine = self._staging.get(name), self.engines.get(name)
        if future is None or engine is None or not future.set_running_or_notify_cancel():
            return
        try:
            engine.prepare()
        except BaseException as exc:  # reported by _finish_preparations, on the loop's thread
            future.set_exception(exc)
        else:
            future.set_result(None)

    def _pin(self, engine: Engine) -> None:
        name = engine.spec.name
        if name not in self._pinning and not engine.image_pinned:
            self._pinning[name] = self._pin_thread.submit(engine.pin_image)

    def _finish_preparations(self) -> None:
        """Collect finished stagings and pinnings; activate a model that was waiting for its preparation. One
        activation a turn: the worker sends its reply before the next one starts, and steps run between them.
        A model with no activation waiting has its image pinned next (after the activation, for one that had)."""
        for name, future in list(self._pinning.items()):
            if future.done():
                del self._pinning[name]
                if future.exception() is not None:
                    logger.error("pinning the image of %s failed: %s", name, future.exception())
        for name, future in list(self._staging.items()):
            if not future.done():
                continue
            del self._staging[name]
            error = future.exception()
            if error is not None:
                self._failed[name] = f"{type(error).__name__}: {error}"
                logger.error("preparing %s failed: %s", name, self._failed[name])
                if self._activations.pop(name, None) is not None:
                    self._send_state()
                    self.outbox.append(m.ModelActivated(name, self._failed[name], "failed"))
            elif name in self._activations and name in self.engines:
                self._finish_activation(self.engines[name])
                return
            elif name in self.engines:
                self._pin(self.engines[name])

    def _finish_activation(self, engine: Engine) -> None:
        spec = engine.spec
        asked, kv_budget_bytes = self._activations.pop(spec.name)
        waited = time.perf_counter() - asked
        try:
            times = engine.activate(kv_budget_bytes, capture_graphs=False)  # captured between steps: _capture_graphs
        except NotEnoughMemory as exc:
            self._send_state()
            self.outbox.append(m.ModelActivated(spec.name, str(exc), "no_memory", weight_bytes=engine.weight_bytes))
            return
        except Exception as exc:  # any load failure is reported; the controller fails the model's requests
            logger.error("activating %s failed:\n%s", spec.name, traceback.format_exc())
            self._send_state()
            self.outbox.append(m.ModelActivated(spec.name, f"{type(exc).__name__}: {exc}", "failed"))
            return
        times.stage_s += waited  # the wait for its preparation was on the activation's path
        times.total_s += waited
        self._failed.pop(spec.name, None)
        self._idle_since = None  # idleness counts from after the activation: its request is on its way now
        self.scheduler.add_model(model_queue(engine))
        if not engine.graphs_captured:
            self._eager_since[spec.name] = time.perf_counter()
        self._pin(engine)
        logger.info(
            "activated %s in %.3f s (stage %.3f, map+copy %.3f, build %.3f; %.1f MiB of weights%s%s)",
            spec.name, times.total_s, times.stage_s, times.map_copy_s, times.build_s, engine.weight_bytes / 2**20,
            f", {100 * times.pinned_fraction:.0f}% of its image pinned" if self.device.type == "cuda" else "",
            "" if engine.graphs_captured else "; eager until its graphs are captured",
        )
        self._send_state()
        self.outbox.append(self._activated(engine))
        self._freeze_when_idle = True  # its modules and graphs live as long as it does: out of full collections

    def capture_graphs_now(self, name: str) -> None:
        """Capture an active model's graphs at once (for callers that drive the loop by hand: the offline
        runner, whose steps should be the replayed ones)."""
        self.finish_running_step()
        self.engines[name].capture_graphs()
        self._charge_graph_memory(name, self.engines[name])
        self._eager_since.pop(name, None)

    def _capture_graphs(self) -> None:
        """Capture one model's CUDA graphs when the device has been idle (no step queued, no activation
        waiting) for IDLE_BEFORE_CAPTURE_S: an active model running eager first, else a prepared one ahead of
        its activation, if the pool can lend the pages. Under load, an active model that has run eager for
        GRAPHS_DUE_S has its graphs captured between two steps.
        Never while a staging or pinning thread runs: a capture must be the only CUDA work in the process."""
        now = time.perf_counter()
        busy = self.scheduler.has_work() or bool(self._activations)
        self._idle_since = None if busy else (self._idle_since or now)
        if self._staging or self._pinning or self.device.type != "cuda":
            return
        if busy:
            due = [name for name, since in self._eager_since.items() if now - since >= GRAPHS_DUE_S]
            if not due:
                return
            self.finish_running_step()  # the capture must not overlap a step on another stream
            candidates = due[:1]
        elif not self._idle_for(self.idle_before_capture_s):
            return
        else:
            candidates = [*self._eager_since, *(
                name for name, engine in self.engines.items()
                if engine.prepared and not engine.graphs_captured and not self.is_resident(name) and name not in self._activations
            )]
        for name in candidates:
            engine = self.engines[name]
            started = time.perf_counter()
            try:
                captured = engine.capture_graphs()
            except Exception:
                self._eager_since.pop(name, None)
                self._failed[name] = "capturing its CUDA graphs failed (see the worker log)"
                logger.error("capturing the graphs of %s failed:\n%s", name, traceback.format_exc())
                continue
            if not captured and name in self._eager_since:
                self._eager_since[name] = time.perf_counter()  # no room now (KV full under load): due again later
            if captured:
                self._charge_graph_memory(name, engine)
                self._freeze_not_before = time.perf_counter() + self.idle_before_capture_s
                when = "after it ran eager" if self._eager_since.pop(name, None) is not None else "ahead of its activation"
                logger.info("captured the CUDA graphs of %s %s in %.3f s", name, when, time.perf_counter() - started)
                self._freeze_when_idle = True
                return

    def _charge_graph_memory(self, name: str, engine: Engine) -> None:
        """Take what a capture left held on the device (graph pools, warm-up buffers: torch's allocator, outside
        the pool) off the pool's budget, for as long as the engine lives, so that the pool's accounting is the
        device's truth; the heartbeat's budget tells the controller. (Mapped pages over the smaller budget
        stay mapped; maps wait until enough are unmapped: memory/pool.py.)"""
        if engine.graph_bytes <= 0 or name in self._graph_pages:
            return
        pages = -(-engine.graph_bytes // self.pool.page_bytes)
        self._graph_pages[name] = pages
        over = self.pool.set_budget(max(0, self.pool.budget_pages - pages) * self.pool.page_bytes)
        logger.info("the CUDA graphs of %s hold %.0f MiB outside the pool: its budget is %.2f GiB now%s", name,
                    engine.graph_bytes / 2**20, self.pool.budget_pages * self.pool.page_bytes / 2**30,
                    f" ({over} mapped pages over it)" if over else "")

    @staticmethod
    def _activated(engine: Engine) -> m.ModelActivated:
        t = engine.last_activation
        return m.ModelActivated(
            engine.spec.name, None, None, engine.weight_bytes, engine.kv.max_blocks,
            t.stage_s, t.map_copy_s, t.build_s, t.total_s, engine.graphs_captured,
        )

    def _on_evict(self, message: m.Evict) -> None:
        started = time.perf_counter()
        failed = self._evict(message.name, f"the model was evicted ({message.reason})" if message.reason else "the model was evicted")
        self._send_state()
        self.outbox.append(m.ModelEvicted(message.name, time.perf_counter() - started, failed))

    def _on_forget(self, message: m.Forget) -> None:
        self._forget(message.name)
        self._send_state()
        self.outbox.append(m.ModelEvicted(message.name, 0.0, 0))

    def _evict(self, name: str, error: str) -> int:
        """Fail the model's unfinished requests, then unmap its weights and KV; return how many failed."""
        if not self.is_resident(name):
            return 0
        engine = self.engines[name]
        self._eager_since.pop(name, None)
        orphans = self.scheduler.remove_model(name)
        for seq in orphans:
            engine.release(seq.req_id)
        if orphans:
            self.outbox.append(m.StepOutputs([m.TokenDelta(s.req_id, [], "error", error, "unavailable") for s in orphans]))
        engine.deactivate()
        logger.info("evicted %s (%d unfinished request(s) failed)", name, len(orphans))
        return len(orphans)

    def _forget(self, name: str) -> None:
        self._evict(name, "the model was removed")
        with self._stage_lock:
            if name in self._stage_queue:
                self._stage_queue.remove(name)
        for running in (self._staging.pop(name, None), self._pinning.pop(name, None)):
            if running is not None and not running.cancel():  # let its thread finish with the engine before the engine goes
                running.exception()
        if self._activations.pop(name, None) is not None:
            self.outbox.append(m.ModelActivated(name, "the model was removed", "failed"))
        self._failed.pop(name, None)
        engine = self.engines.pop(name, None)
        if engine is not None:
            engine.close()
            del engine
            collect_frozen()  # its objects were frozen at activation: reference cycles among them are freed now
        pages = self._graph_pages.pop(name, 0)
        if pages:  # its graphs are gone: what they held goes back to the device, then to the pool
            torch.cuda.empty_cache()
            self.pool.set_budget((self.pool.budget_pages + pages) * self.pool.page_bytes)

    def _on_generate(self, message: m.Generate) -> None:
        seq, error, kind = self.sequence(message)
        if seq is None:
            logger.warning("request refused: %s", error, extra={"req_id": message.req_id, "model": message.model})
            self.outbox.append(m.StepOutputs([m.TokenDelta(message.req_id, [], "error", error, kind)]))
            return
        self.scheduler.add(seq)

    def sequence(self, message: m.Generate) -> tuple[Sequence | None, str | None, m.RequestErrorKind | None]:
        """The scheduler's sequence for a request, or why it is refused (and the error's kind)."""
        if not self.is_resident(message.model):
            return None, f"model {message.model!r} is not resident on worker {self.worker_id}", "not_resident"
        spec = self.engines[message.model].spec
        vocab_size = self.engines[message.model].arch.vocab_size
        prompt = message.prompt_token_ids
        error = None
        if not prompt:
            error = "empty prompt"
        elif len(prompt) + message.sampling.max_tokens > spec.max_model_len:
            error = f"prompt + max_tokens exceeds the context of {spec.max_model_len} tokens"
        elif max(prompt) >= vocab_size or min(prompt) < 0:
            error = f"token ids must be in [0, {vocab_size})"
        if error is not None:
            return None, error, "invalid_request"
        params = message.sampling
        return Sequence(
            req_id=message.req_id,
            model=message.model,
            prompt_token_ids=list(prompt),
            max_tokens=params.max_tokens,
            arrival_s=message.arrival_s,
            sampling=params,
            min_tokens=params.min_tokens,
            stop_token_ids=frozenset(params.stop_token_ids),
            eos_token_ids=frozenset() if params.ignore_eos else frozenset(spec.eos_token_ids),
            max_model_len=spec.max_model_len,
            ttft_deadline_s=message.arrival_s + spec.ttft_slo_s,
        ), None, None

    def _on_abort(self, message: m.Abort) -> None:
        for req_id in message.req_ids:
            seq = self.scheduler.abort(req_id)
            if seq is not None:
                self.engines[seq.model].release(req_id)
                logger.debug("aborted after %d tokens", seq.num_output_tokens, extra={"req_id": req_id, "model": seq.model})

    def _on_shutdown(self, message: m.Shutdown) -> None:
        self.stopping = True

    # --- outputs ----------------------------------------------------------------------------------

    def _publish(self, outcome: StepOutcome) -> None:
        plan, engine = outcome.plan, self.engines[outcome.plan.model]
        reasons = {seq.req_id: seq.finish_reason for seq in outcome.finished}
        deltas = [m.TokenDelta(req_id, [token], reasons.get(req_id)) for req_id, token in outcome.sampled.items()]
        deltas += [
            m.TokenDelta(seq.req_id, [], "error", "the prompt does not fit this model's KV cache", "invalid_request")
            for seq in plan.rejected
        ]
        deltas += [
            m.TokenDelta(seq.req_id, [], "error", "internal engine error (see the worker log)", "internal")
            for seq in outcome.failed
        ]
        for req_id in [*reasons, *(seq.req_id for seq in outcome.failed)]:
            engine.release(req_id)
        if deltas:
            self.outbox.append(m.StepOutputs(deltas))

    def _send_state(self) -> None:
        """Report the models' and the pool's state. Also sent just before every reply to an activation or
        eviction: messages arrive in order, so the controller never sees a model state change before the
        memory that goes with it (its device view would lag by up to a heartbeat interval)."""
        self.outbox.append(m.Heartbeat(self.worker_id, self.model_stats(), self.pool_stats(), self.scheduler.num_steps,
                                       self.steps.device_busy_s, self.gc_stats() if self.gc_stats else None))

    def model_stats(self) -> list[m.ModelStats]:
        stats = []
        for name, engine in self.engines.items():
            queue = self.scheduler.queues.get(name)
            counts = self.steps.counts.get(name, StepCounts())
            stats.append(
                m.ModelStats(
                    name=name,
                    resident=queue is not None,
                    num_waiting=len(queue.waiting) if queue else 0,
                    num_running=len(queue.running) if queue else 0,
                    num_kv_blocks_used=engine.kv.num_used_blocks,
                    num_kv_blocks_total=engine.kv.max_blocks,
                    kv_pages_mapped=engine.kv.num_mapped_pages,
                    weight_bytes=engine.weight_bytes,
                    num_steps=counts.steps,
                    num_scheduled_tokens=counts.tokens,
                    num_preemptions=counts.preemptions,
                    step_device_s=counts.device_s,
                    prefill_tokens_per_s=self.scheduler.prefill_speed.tokens_per_s(name),
                    preparation=self._preparation(name, engine),
                    graphs_captured=engine.graphs_captured,
                )
            )
        return stats

    def _preparation(self, name: str, engine: Engine) -> str:
        if name in self._failed:
            return f"failed: {self._failed[name]}"
        if self.is_resident(name):
            return "prepared"
        if engine.prepared and name in self._pinning:
            return "staged, pinning"  # its image: an activation now copies the unpinned part through bounce buffers
        if engine.prepared and not engine.graphs_captured:
            return "staged, graphs pending"  # captured when the device is idle and the pool can lend the capture scratch
        if engine.prepared:
            return "prepared"
        return "staging" if name in self._staging else "not prepared"

    def pool_stats(self) -> m.PoolStats:
        snap = self.pool.snapshot()
        return m.PoolStats(
            budget_bytes=snap.budget_pages * snap.page_bytes,
            page_bytes=snap.page_bytes,
            pages_mapped=snap.pages_mapped,
            pages_free=snap.pages_free,
            pages_reserved=snap.pages_reserved,
            kv_pages_by_model=snap.kv_pages,
            weight_pages_by_model=snap.weight_pages,
            scratch_pages=snap.scratch_pages,
            ranges_reserved=snap.ranges_reserved,
            va_bytes_reserved=snap.va_bytes_reserved,
        )
