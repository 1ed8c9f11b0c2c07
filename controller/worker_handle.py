"""One worker process as the controller sees it: its channel, its in-flight requests, its supervision.

The handle starts the worker and restarts it when it exits unexpectedly: every in-flight request of it
is failed at once (a 5xx, never a hang), pending activations and evictions fail, and the model manager
is told that the worker's models are gone (they are activated again on demand). With `standby`, a spare
worker process waits beside the live one with its imports done (`workers.main --standby`) and takes over
at once; a new spare starts when the new worker is ready. A worker that connects
says Hello and gets its configuration (`Configure`) in answer.

A `remote` handle stands for a worker that joined over the network (`prism worker` on another host, or
a Ray actor): the controller did not start it and cannot see its process. A new process under the same id
(it says Hello with another pid) replaces the old one as a restart does; a worker that says Goodbye, or
sends no heartbeat for `heartbeat_timeout_s`, has left (`on_leave`). `activate` and `evict` send the message
and wait for the worker's reply; `submit` and `abort` carry requests; every heartbeat is handed to the
model manager, which reconciles what it believes the worker holds with what the worker reports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from controller.channel import WorkerChannel
from workers.contract import messages as m
from workers.contract.channel_keys import SECRET_ENV
from workers.contract.config import WorkerConfig

logger = logging.getLogger("prism.controller")

RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0)  # by restarts in a row (a worker that ran a minute resets it)


class WorkerGone(RuntimeError):
    """The worker exited (or is stopping) before it answered; the caller fails or retries its operation."""


@dataclass(eq=False)
class RequestStream:
    """Deltas of one request, in order; the last one has a finish_reason."""

    req_id: str
    model: str
    worker_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    num_tokens: int = 0

    async def next(self) -> m.TokenDelta:
        delta = await self.queue.get()
        self.num_tokens += len(delta.token_ids)
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
    def __init__(self, worker_id: str, device: str, channel: WorkerChannel, config: WorkerConfig, log_format: str = "text",
                 standby: bool = False, remote: bool = False, heartbeat_timeout_s: float = 10.0, shutdown_on_stop: bool = True):
        self.worker_id = worker_id
        self.standby = standby and not remote
        self.remote = remote
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.shutdown_on_stop = shutdown_on_stop  # remote: ask it to exit when the controller stops (else its launcher stops it)
        self.device = device
        self.channel = channel
        self.config = config
        self.log_format = log_format
        self.state = "stopped"  # stopped | starting | ready | dead
        self.pid: int | None = None
        self.num_restarts = 0
        self.pool_budget_bytes = 0
        self.streams: dict[str, RequestStream] = {}
        self.last_heartbeat: m.Heartbeat | None = None
        self.last_heartbeat_s = 0.0
        self.on_exit: Callable[[WorkerHandle], None] | None = None  # the model manager's hooks
        self.on_ready: Callable[[WorkerHandle], None] | None = None
        self.on_heartbeat: Callable[[WorkerHandle, m.Heartbeat], None] | None = None
        self.on_leave: Callable[[WorkerHandle], None] | None = None  # a remote worker left (after on_exit)
        self._process: asyncio.subprocess.Process | None = None
        self._standby: asyncio.subprocess.Process | None = None  # the spare, waiting for its go on stdin
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self._ready = asyncio.Event()
        self._activations: dict[str, asyncio.Future] = {}
        self._evictions: dict[str, asyncio.Future] = {}
        channel.register(worker_id, self.on_message)
        self._handlers = {
            m.Hello: self._on_hello,
            m.WorkerReady: self._on_ready,
            m.ModelActivated: self._on_activated,
            m.ModelEvicted: self._on_evicted,
            m.StepOutputs: self._on_step_outputs,
            m.Heartbeat: self._on_heartbeat,
            m.Goodbye: self._on_goodbye,
        }

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        if self.remote:  # it is running already: watch its heartbeats instead of its process
            self.state = "starting"
            self._supervisor = asyncio.create_task(self._watch_heartbeats(), name=f"watch-{self.worker_id}")
            return
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.worker_id}")

    @property
    def kind(self) -> str:
        """`cpu` or `cuda`."""
        return self.device.split(":")[0]

    @property
    def standby_pid(self) -> int | None:
        """The spare's process id while one waits to take over."""
        spare = self._standby
        return spare.pid if spare is not None and spare.returncode is None else None

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "workers.main",
            "--controller", self.channel.address,
            "--device", self.device,
            "--worker-id", self.worker_id,
            "--parent-pid", str(os.getpid()),
            "--log-level", logging.getLevelName(logging.getLogger("prism").getEffectiveLevel()),
            "--log-format", self.log_format,
        ]

    def _environment(self) -> dict[str, str]:
        return {**os.environ, SECRET_ENV: self.channel.secret}  # not on the command line: other users can read that

    async def _spawn(self) -> None:
        self.state = "starting"
        spare, self._standby = self._standby, None
        if spare is not None and spare.returncode is None:
            try:
                spare.stdin.write(b"go\n")
                await spare.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                spare = None  # it died meanwhile
        else:
            spare = None
        if spare is not None:
            self._process = spare
            logger.info("worker %s: its standby (pid %d) takes over on %s", self.worker_id, spare.pid, self.device)
        else:
            self._process = await asyncio.create_subprocess_exec(*self._command(), env=self._environment())
            logger.info("started worker %s (pid %d) on %s", self.worker_id, self._process.pid, self.device)
        self.pid = self._process.pid

    async def _start_standby(self) -> None:
        if not self.standby or self._stopping or (self._standby is not None and self._standby.returncode is None):
            return
        self._standby = await asyncio.create_subprocess_exec(*self._command(), "--standby", stdin=asyncio.subprocess.PIPE,
                                                             env=self._environment())
        logger.info("worker %s: a standby (pid %d) waits to take over", self.worker_id, self._standby.pid)
        if self._stopping:  # stop() ran while it started
            await self._stop_standby(10.0)

    async def _stop_standby(self, timeout_s: float) -> None:
        spare, self._standby = self._standby, None
        if spare is None or spare.returncode is not None:
            return
        spare.stdin.close()  # end of input: it exits
        try:
            await asyncio.wait_for(spare.wait(), timeout_s)
        except asyncio.TimeoutError:
            spare.kill()
            await spare.wait()

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

    async def _watch_heartbeats(self) -> None:
        """A remote worker has left when it sends nothing for `heartbeat_timeout_s` (from Hello on)."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_timeout_s / 4))
            silent_s = time.monotonic() - self.last_heartbeat_s
            if self.state in ("starting", "ready") and silent_s > self.heartbeat_timeout_s:
                self._leave(f"worker {self.worker_id} sent no heartbeat for {silent_s:.1f} s")
                return

    def _leave(self, reason: str) -> None:
        """A remote worker is gone for good: fail what it had, then let the model manager place its models elsewhere."""
        if self.state in ("stopped", "left"):
            return
        logger.error("%s; it has left: failing %d in-flight request(s)", reason, len(self.streams))
        self._lost(reason)
        self.state = "left"
        if self._supervisor is not None and self._supervisor is not asyncio.current_task():
            self._supervisor.cancel()
        if self.on_leave is not None:
            self.on_leave(self)

    def _on_exit(self, returncode: int | None) -> None:
        reason = f"worker {self.worker_id} exited with {describe_exit(returncode)}"
        logger.error("%s; failing %d in-flight request(s) and restarting it", reason, len(self.streams))
        self._lost(reason)

    def _lost(self, reason: str) -> None:
        self.state = "dead"
        self._ready.clear()
        self._fail_everything(f"{reason} while serving this request", "internal", WorkerGone(reason))
        if self.on_exit is not None:
            self.on_exit(self)

    def _fail_everything(self, message: str, kind: str, error: Exception) -> None:
        for stream in list(self.streams.values()):
            stream.queue.put_nowait(m.TokenDelta(stream.req_id, [], "error", message, kind))
        self.streams.clear()
        for future in [*self._activations.values(), *self._evictions.values()]:
            if not future.done():
                future.set_exception(error)
        self._activations.clear()
        self._evictions.clear()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout_s`. Fails what is still in flight."""
        self._stopping = True
        if self.remote:  # not ours to wait for: ask it to shut down (its supervisor decides what comes next)
            if self.state == "ready" and self.shutdown_on_stop:
                self.channel.send(self.worker_id, m.Shutdown())
            process = None
        else:
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
        await self._stop_standby(timeout_s)
        self._fail_everything("the server is shutting down", "unavailable", WorkerGone("the server is shutting down"))
        self.state = "stopped"

    # --- models -----------------------------------------------------------------------------------

    def prepare(self, spec: m.ModelSpec) -> None:
        """Have the worker prepare the model in the background (no reply: its heartbeats show progress)."""
        if self.state == "ready":
            self.channel.send(self.worker_id, m.Prepare(spec))

    async def activate(self, spec: m.ModelSpec, kv_budget_bytes: int | None = None) -> m.ModelActivated:
        """Make the model resident here; the worker's reply (an error reply is returned, not raised)."""
        if self.state != "ready":
            raise WorkerGone(f"worker {self.worker_id} is {self.state}")
        future = self._activations.get(spec.name)
        if future is None:
            future = self._activations[spec.name] = asyncio.get_running_loop().create_future()
            self.channel.send(self.worker_id, m.Activate(spec, kv_budget_bytes))
        return await asyncio.shield(future)

    def cancel_activation(self, name: str) -> None:
        """Withdraw `name`'s activation if the worker is still preparing for it (its reply settles it)."""
        if self.state == "ready" and name in self._activations:
            self.channel.send(self.worker_id, m.CancelActivation(name))

    async def evict(self, name: str, reason: str) -> m.ModelEvicted:
        if self.state != "ready":
            raise WorkerGone(f"worker {self.worker_id} is {self.state}")
        future = self._evictions.get(name)
        if future is None:
            future = self._evictions[name] = asyncio.get_running_loop().create_future()
            self.channel.send(self.worker_id, m.Evict(name, reason))
        return await asyncio.shield(future)

    async def forget(self, name: str) -> None:
        if self.state != "ready":
            return  # a restarted worker has no engine for it anyway
        future = self._evictions[name] = asyncio.get_running_loop().create_future()
        self.channel.send(self.worker_id, m.Forget(name))
        await asyncio.shield(future)

    # --- requests ---------------------------------------------------------------------------------

    def num_streams(self, model: str) -> int:
        """The model's requests in flight on this worker."""
        return sum(1 for stream in self.streams.values() if stream.model == model)

    def submit(self, req_id: str, model: str, prompt_token_ids: list[int], sampling: m.SamplingParams, arrival_s: float) -> RequestStream:
        if self.state != "ready":
            raise WorkerGone(f"worker {self.worker_id} is {self.state}")
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

    def _on_hello(self, message: m.Hello) -> None:
        if self.remote and self.state in ("starting", "ready") and self.pid not in (None, message.pid):
            # A new process took over the id (a supervisor restarted it): the old one and what it held are gone.
            logger.error("worker %s: a new process (pid %d) replaces pid %d; failing %d in-flight request(s)",
                         self.worker_id, message.pid, self.pid, len(self.streams))
            self._lost(f"worker {self.worker_id} was replaced by a new process")
        if self.remote:
            self.state = "starting"
            self.last_heartbeat_s = time.monotonic()  # the watch counts from Hello
        logger.info("worker %s connected (pid %d, %s); sending its configuration", self.worker_id, message.pid, message.device)
        self.pid = message.pid
        self.channel.send(self.worker_id, m.Configure(self.config))

    def _on_ready(self, message: m.WorkerReady) -> None:
        self.state = "ready"
        self.pid = message.pid
        self.pool_budget_bytes = message.pool_budget_bytes
        self._ready.set()
        logger.info("worker %s ready (pid %d, pool %.2f GiB)", self.worker_id, message.pid, message.pool_budget_bytes / 2**30)
        if self.standby:
            asyncio.get_running_loop().create_task(self._start_standby(), name=f"standby-{self.worker_id}")
        if self.on_ready is not None:
            self.on_ready(self)

    def _on_activated(self, message: m.ModelActivated) -> None:
        future = self._activations.pop(message.name, None)
        if future is not None and not future.done():
            future.set_result(message)

    def _on_evicted(self, message: m.ModelEvicted) -> None:
        future = self._evictions.pop(message.name, None)
        if future is not None and not future.done():
            future.set_result(message)

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
        if message.pool.budget_bytes:  # it shrinks as CUDA graphs are captured (their memory is charged to it)
            self.pool_budget_bytes = message.pool.budget_bytes
        if self.on_heartbeat is not None and self.state == "ready":
            self.on_heartbeat(self, message)

    def _on_goodbye(self, message: m.Goodbye) -> None:
        if message.pid != self.pid:
            return  # an old process's last word, after its successor said Hello
        logger.info("worker %s (pid %d) says goodbye: %s", self.worker_id, message.pid, message.reason)
        if self.remote and not self._stopping:
            self._leave(f"worker {self.worker_id} exited ({message.reason})")

    def model_stats(self, name: str) -> m.ModelStats | None:
        beat = self.last_heartbeat
        if beat is None:
            return None
        return next((s for s in beat.models if s.name == name), None)
