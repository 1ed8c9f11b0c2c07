"""The worker: one process per device, hosting the engines of every model resident on that device.

One loop: drain the inbox (typed messages from the controller) -> the step loop launches the step the
local scheduler plans and finishes the one before it (`step_loop.py`: one model's step runs on the GPU
while the next model's is prepared) -> token deltas go back to the controller in one message per step.
Heartbeats carry the pool's and the models' state. Whatever goes wrong with one request (bad input, an
engine error) finishes that request with an error delta; the worker itself keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
import traceback

import torch
import zmq

from memory import PagePool
from memory.host_store import HostWeightStore
from scheduler.local import LocalScheduler
from scheduler.local_policy import DEFAULT_TPOT_TARGET
from scheduler.sequence import Sequence
from workers import messages as m
from workers.engine.engine import Engine, NotEnoughMemory
from workers.gc_heap import GcPauses, collect_frozen, freeze_heap
from workers.step_loop import StepCounts, StepLoop, StepOutcome, model_queue

logger = logging.getLogger("prism.worker")

HEARTBEAT_INTERVAL_S = 1.0


def make_pool(device: str, budget_bytes: int, page_bytes: int, gpu_memory_utilization: float = 0.9) -> PagePool:
    """The device's page pool. On a GPU a zero budget means: this share of the GPU, less what is in use."""
    if device == "cpu":
        from memory.host_backend import HostBackend

        return PagePool(HostBackend(page_bytes), budget_bytes)
    from memory.cuda_backend import CudaBackend

    torch.cuda.set_device(torch.device(device))
    if budget_bytes <= 0:
        free, total = torch.cuda.mem_get_info()
        headroom = 2 * 1024**3  # activations, CUDA graph pools, cuBLAS workspaces: outside the pool
        budget_bytes = int(gpu_memory_utilization * total) - (total - free) - headroom
    # Every page of a GPU budget is created up front and kept: mapping then never waits for cuMemCreate.
    budget_pages = budget_bytes // page_bytes
    return PagePool(CudaBackend(device, page_bytes), budget_bytes, reserve_pages=budget_pages)


class Worker:
    def __init__(self, worker_id: str, device: str, controller_address: str, pool: PagePool, store: HostWeightStore,
                 parent_pid: int | None = None, local_policy: str = "prism", overlap: bool = True, tpot_target: str = DEFAULT_TPOT_TARGET):
        self.worker_id = worker_id
        self.device = torch.device(device)
        self.pool = pool
        self.store = store
        self.parent_pid = parent_pid
        self.scheduler = LocalScheduler(local_policy, tpot_target=tpot_target)
        self.engines: dict[str, Engine] = {}
        self.steps = StepLoop(self.scheduler, self.engines, overlap)
        self.gc_pauses = GcPauses().install()
        self.stopping = False
        self._last_heartbeat = 0.0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, worker_id.encode())
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.connect(controller_address)
        self._handlers = {
            m.Activate: self._on_activate,
            m.Evict: self._on_evict,
            m.Forget: self._on_forget,
            m.Generate: self._on_generate,
            m.Abort: self._on_abort,
            m.Shutdown: self._on_shutdown,
        }

    # --- main loop --------------------------------------------------------------------------------

    def run(self) -> None:
        logger.info("start-up heap: %s", freeze_heap().describe())  # full collections would walk it every time
        self._send(m.WorkerReady(self.worker_id, str(self.device), os.getpid(), self.pool.budget_pages * self.pool.page_bytes))
        try:
            while not self.stopping:
                self._drain_inbox(timeout_ms=0 if self.scheduler.has_work() else 50)
                self._step()
                self._heartbeat_if_due()
        finally:
            self._finish_running_step()
            for engine in self.engines.values():
                engine.close()
            self.store.drop_all()
            self._socket.close()
            self._context.term()
            self.gc_pauses.uninstall()

    def _drain_inbox(self, timeout_ms: int) -> None:
        if not self._socket.poll(timeout_ms):
            return
        while True:
            try:
                data = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = m.decode_to_worker(data)
            if not isinstance(message, m.Generate):  # may free or unmap memory a running step uses
                self._finish_running_step()
            self._handlers[type(message)](message)

    def _step(self) -> None:
        for outcome in self.steps.advance():
            self._publish(outcome)

    def _finish_running_step(self) -> None:
        for outcome in self.steps.drain():
            self._publish(outcome)

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
            self._send(m.StepOutputs(deltas))

    def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_INTERVAL_S:
            return
        self._last_heartbeat = now
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.warning("controller (pid %d) is gone; worker exits", self.parent_pid)
            self.stopping = True
            return
        self._finish_running_step()  # trimming unmaps pages: not under a running kernel
        self._trim_kv()
        self.pool.replenish_reserve()
        self._send_state()

    def _send_state(self) -> None:
        """Report the models' and the pool's state. Also sent just before every reply to an activation or
        eviction: messages arrive in order, so the controller never sees a model state change before the
        memory that goes with it (its device view would lag by up to a heartbeat interval)."""
        self._send(m.Heartbeat(self.worker_id, self.model_stats(), self.pool_stats(), self.scheduler.num_steps,
                               self.steps.device_busy_s, self.gc_pauses.stats()))

    def _trim_kv(self) -> None:
        """Give empty KV pages back to the pool: all of a model with no work (hysteresis is for bursts), the
        ones beyond its hysteresis for the others (on a GPU, `free` leaves them to this: see KVSpace)."""
        for name, queue in self.scheduler.queues.items():
            self.engines[name].kv.trim_idle(bool(queue.running or queue.waiting))

    # --- handlers ---------------------------------------------------------------------------------

    def _on_activate(self, message: m.Activate) -> None:
        spec = message.spec
        engine = self.engines.get(spec.name)
        if engine is not None and engine.spec != spec:  # the model was updated: rebuild its engine
            self._forget(spec.name)
            engine = None
        if engine is not None and engine.active:
            self._send(self._activated(engine))
            return
        try:
            if engine is None:
                engine = self.engines[spec.name] = Engine(spec, self.device, self.pool, self.store)
            times = engine.activate()
        except NotEnoughMemory as exc:
            self._send_state()
            self._send(m.ModelActivated(spec.name, str(exc), "no_memory", weight_bytes=engine.weight_bytes if engine else 0))
            return
        except Exception as exc:  # any load failure is reported; the controller fails the model's requests
            logger.error("activating %s failed:\n%s", spec.name, traceback.format_exc())
            self._send_state()
            self._send(m.ModelActivated(spec.name, f"{type(exc).__name__}: {exc}", "failed"))
            return
        self.scheduler.add_model(model_queue(engine))
        logger.info(
            "activated %s in %.3f s (stage %.3f, map+copy %.3f, build %.3f, graphs %.3f; %.1f MiB of weights)",
            spec.name, times.total_s, times.stage_s, times.map_copy_s, times.build_s, times.graphs_s, engine.weight_bytes / 2**20,
        )
        # A new engine's modules and graphs live as long as it does (after a re-activation this walks little).
        logger.info("after activating %s: %s", spec.name, freeze_heap().describe())
        self._send_state()
        self._send(self._activated(engine))

    @staticmethod
    def _activated(engine: Engine) -> m.ModelActivated:
        t = engine.last_activation
        return m.ModelActivated(
            engine.spec.name, None, None, engine.weight_bytes, engine.kv.max_blocks,
            t.stage_s, t.map_copy_s, t.build_s, t.graphs_s, t.total_s,
        )

    def _on_evict(self, message: m.Evict) -> None:
        started = time.perf_counter()
        failed = self._evict(message.name, f"the model was evicted ({message.reason})" if message.reason else "the model was evicted")
        self._send_state()
        self._send(m.ModelEvicted(message.name, time.perf_counter() - started, failed))

    def _on_forget(self, message: m.Forget) -> None:
        self._forget(message.name)
        self._send_state()
        self._send(m.ModelEvicted(message.name, 0.0, 0))

    def _evict(self, name: str, error: str) -> int:
        """Fail the model's unfinished requests, then unmap its weights and KV; return how many failed."""
        engine = self.engines.get(name)
        if engine is None or not engine.active:
            return 0
        orphans = self.scheduler.remove_model(name)
        for seq in orphans:
            engine.release(seq.req_id)
        if orphans:
            self._send(m.StepOutputs([m.TokenDelta(s.req_id, [], "error", error, "unavailable") for s in orphans]))
        engine.deactivate()
        logger.info("evicted %s (%d unfinished request(s) failed)", name, len(orphans))
        return len(orphans)

    def _forget(self, name: str) -> None:
        self._evict(name, "the model was removed")
        engine = self.engines.pop(name, None)
        if engine is not None:
            engine.close()
            del engine
            collect_frozen()  # its objects were frozen at activation: reference cycles among them are freed now

    def _on_generate(self, message: m.Generate) -> None:
        engine = self.engines.get(message.model)
        error = None
        if engine is None or not engine.active:
            error = f"model {message.model!r} is not loaded on this worker"
        elif not message.prompt_token_ids:
            error = "empty prompt"
        elif len(message.prompt_token_ids) + message.sampling.max_tokens > engine.spec.max_model_len:
            error = f"prompt + max_tokens exceeds the context of {engine.spec.max_model_len} tokens"
        elif max(message.prompt_token_ids) >= engine.arch.vocab_size or min(message.prompt_token_ids) < 0:
            error = f"token ids must be in [0, {engine.arch.vocab_size})"
        if error is not None:
            kind = "unavailable" if engine is None or not engine.active else "invalid_request"
            logger.warning("request refused: %s", error, extra={"req_id": message.req_id, "model": message.model})
            self._send(m.StepOutputs([m.TokenDelta(message.req_id, [], "error", error, kind)]))
            return
        params = message.sampling
        spec = engine.spec
        self.scheduler.add(
            Sequence(
                req_id=message.req_id,
                model=message.model,
                prompt_token_ids=list(message.prompt_token_ids),
                max_tokens=params.max_tokens,
                arrival_s=message.arrival_s,
                sampling=params,
                min_tokens=params.min_tokens,
                stop_token_ids=frozenset(params.stop_token_ids),
                eos_token_ids=frozenset() if params.ignore_eos else frozenset(spec.eos_token_ids),
                max_model_len=spec.max_model_len,
                ttft_deadline_s=message.arrival_s + spec.ttft_slo_s,
            )
        )

    def _on_abort(self, message: m.Abort) -> None:
        for req_id in message.req_ids:
            seq = self.scheduler.abort(req_id)
            if seq is not None:
                self.engines[seq.model].release(req_id)
                logger.debug("aborted after %d tokens", seq.num_output_tokens, extra={"req_id": req_id, "model": seq.model})

    def _on_shutdown(self, message: m.Shutdown) -> None:
        self.stopping = True

    # --- state ------------------------------------------------------------------------------------

    def model_stats(self) -> list[m.ModelStats]:
        stats = []
        for name, engine in self.engines.items():
            queue = self.scheduler.queues.get(name)
            counts = self.steps.counts.get(name, StepCounts())
            stats.append(
                m.ModelStats(
                    name=name,
                    active=engine.active,
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
                )
            )
        return stats

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
        )

    def _send(self, message) -> None:
        self._socket.send(m.encode(message))
