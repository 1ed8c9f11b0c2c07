"""One worker process as the controller sees it: its models, its in-flight requests, its supervision.

The handle starts the worker, sends it the models placed on it once it reports ready, routes its token
deltas to the requests' streams, and watches the process: when it exits unexpectedly, every in-flight
request of it is failed at once (a 5xx, never a hang), its models are marked not ready (new requests wait),
and it is restarted with backoff and given its models again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass, field

from controller.channel import WorkerChannel
from workers import messages as m

logger = logging.getLogger("prism.controller")

RESTART_BACKOFF_S = (0.2, 1.0, 2.0, 5.0, 10.0)


@dataclass
class ModelSlot:
    spec: m.ModelSpec
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    weight_bytes: int = 0
    load_s: float = 0.0
    num_kv_blocks: int = 0
    failed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class RequestStream:
    """Deltas of one request, in order; the last one has a finish_reason."""

    req_id: str
    model: str
    worker_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False

    async def next(self) -> m.TokenDelta:
        delta = await self.queue.get()
        if delta.finish_reason is not None:
            self.finished = True
        return delta


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown status"
    if returncode < 0:
        try:
            return f"signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class WorkerHandle:
    def __init__(self, worker_id: str, device: str, channel: WorkerChannel, budget_bytes: int, page_bytes: int):
        self.worker_id = worker_id
        self.device = device
        self.channel = channel
        self.budget_bytes = budget_bytes
        self.page_bytes = page_bytes
        self.state = "stopped"  # stopped | starting | ready | dead
        self.pid: int | None = None
        self.num_restarts = 0
        self.slots: dict[str, ModelSlot] = {}
        self.streams: dict[str, RequestStream] = {}
        self.last_heartbeat: m.Heartbeat | None = None
        self.last_heartbeat_s = 0.0
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self._ready = asyncio.Event()
        channel.register(worker_id, self.on_message)
        self._handlers = {
            m.WorkerReady: self._on_ready,
            m.ModelLoaded: self._on_model_loaded,
            m.ModelUnloaded: lambda msg: None,
            m.StepOutputs: self._on_step_outputs,
            m.Heartbeat: self._on_heartbeat,
        }

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.worker_id}")

    async def _spawn(self) -> None:
        import os

        command = [
            sys.executable, "-m", "workers.main",
            "--controller", self.channel.address,
            "--device", self.device,
            "--worker-id", self.worker_id,
            "--budget-bytes", str(self.budget_bytes),
            "--page-bytes", str(self.page_bytes),
            "--parent-pid", str(os.getpid()),
            "--log-level", logging.getLevelName(logging.getLogger("prism").getEffectiveLevel()),
        ]
        self.state = "starting"
        self._process = await asyncio.create_subprocess_exec(*command)
        self.pid = self._process.pid
        logger.info("started worker %s (pid %d) on %s", self.worker_id, self.pid, self.device)

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            returncode = await self._process.wait()
            if self._stopping:
                return
            self._on_exit(returncode)
            if time.monotonic() - started > 60:
                attempt = 0  # it ran a while: restart quickly again
            delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
            attempt += 1
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self.num_restarts += 1
            await self._spawn()

    def _on_exit(self, returncode: int | None) -> None:
        reason = f"worker {self.worker_id} exited with {describe_exit(returncode)}"
        logger.error("%s; failing %d in-flight request(s) and restarting it", reason, len(self.streams))
        self.state = "dead"
        self._ready.clear()
        for slot in self.slots.values():
            slot.ready.clear()
        for stream in list(self.streams.values()):
            stream.queue.put_nowait(m.TokenDelta(stream.req_id, [], "error", f"{reason} while serving this request", "internal"))
        self.streams.clear()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout_s`. Fails what is still in flight."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            if self.state == "ready":
                self.channel.send(self.worker_id, m.Shutdown())
            else:
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("worker %s did not stop in %.0f s; killing it", self.worker_id, timeout_s)
                process.kill()
                await process.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
        for stream in list(self.streams.values()):
            stream.queue.put_nowait(m.TokenDelta(stream.req_id, [], "error", "the server is shutting down", "unavailable"))
        self.streams.clear()
        self.state = "stopped"

    # --- models -----------------------------------------------------------------------------------

    def place(self, spec: m.ModelSpec) -> ModelSlot:
        """Host this model here: loaded now if the worker is up, else as soon as it is."""
        slot = self.slots.get(spec.name)
        if slot is None:
            slot = self.slots[spec.name] = ModelSlot(spec)
        if self.state == "ready":
            self.channel.send(self.worker_id, m.LoadModel(spec))
        return slot

    async def wait_model_ready(self, model: str, timeout_s: float) -> bool:
        """True once the model is loaded here; False after `timeout_s` or if loading failed."""
        slot = self.slots[model]
        if slot.ready.is_set():
            return True
        ready = asyncio.ensure_future(slot.ready.wait())
        failed = asyncio.ensure_future(slot.failed.wait())
        try:
            await asyncio.wait({ready, failed}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            failed.cancel()
        return slot.ready.is_set()

    # --- requests ---------------------------------------------------------------------------------

    def submit(self, req_id: str, model: str, prompt_token_ids: list[int], sampling: m.SamplingParams, arrival_s: float) -> RequestStream:
        stream = RequestStream(req_id, model, self.worker_id)
        self.streams[req_id] = stream
        self.channel.send(self.worker_id, m.Generate(req_id, model, prompt_token_ids, sampling, arrival_s))
        return stream

    def abort(self, req_id: str) -> None:
        if self.streams.pop(req_id, None) is not None and self.state == "ready":
            self.channel.send(self.worker_id, m.Abort([req_id]))

    # --- messages from the worker -----------------------------------------------------------------

    def on_message(self, message: m.FromWorker) -> None:
        self._handlers[type(message)](message)

    def _on_ready(self, message: m.WorkerReady) -> None:
        self.state = "ready"
        self.pid = message.pid
        self._ready.set()
        logger.info("worker %s ready (pid %d, pool %.1f GiB)", self.worker_id, message.pid, message.pool_budget_bytes / 2**30)
        for slot in self.slots.values():
            slot.failed.clear()
            slot.error = None
            self.channel.send(self.worker_id, m.LoadModel(slot.spec))

    def _on_model_loaded(self, message: m.ModelLoaded) -> None:
        slot = self.slots.get(message.name)
        if slot is None:
            return
        if message.error is not None:
            slot.error = message.error
            slot.failed.set()
            logger.error("worker %s could not load %s: %s", self.worker_id, message.name, message.error)
            return
        slot.weight_bytes, slot.load_s, slot.num_kv_blocks = message.weight_bytes, message.load_s, message.num_kv_blocks
        slot.ready.set()
        logger.info("model %s ready on %s (loaded in %.2f s)", message.name, self.worker_id, message.load_s)

    def _on_step_outputs(self, message: m.StepOutputs) -> None:
        for delta in message.deltas:
            stream = self.streams.get(delta.req_id)
            if stream is None:
                continue  # aborted by the controller; the worker learns it on its next inbox drain
            stream.queue.put_nowait(delta)
            if delta.finish_reason is not None:
                del self.streams[delta.req_id]

    def _on_heartbeat(self, message: m.Heartbeat) -> None:
        self.last_heartbeat = message
        self.last_heartbeat_s = time.monotonic()
