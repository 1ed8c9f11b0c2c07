"""The controller's door to the workers: admission limits, routing to the model's worker, abort on exit.

`open_stream` is an async context manager: inside it the request runs on a worker; leaving it early
(client gone, stop string found, timeout, error) aborts the request on the worker, which frees its KV.
A request for a model that is not active waits for the model manager to activate it (the wait counts
in TTFT) up to `worker_start_timeout_s`, then gets 503, or until its own deadline (`request_timeout_s`
from its arrival), then gets 504. A worker that answers that it does not hold the
model (the controller's view was wrong) has the view repaired and the request routed again, once per
attempt up to `ROUTE_ATTEMPTS`, before any token was produced; the client sees only the wait.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

from controller.errors import Overloaded, RequestTimeout, Unavailable
from controller.models import ModelManager
from controller.registry import ServerConfig
from controller.worker_handle import RequestStream, WorkerGone, WorkerHandle
from workers.contract.messages import SamplingParams, TokenDelta

ROUTE_ATTEMPTS = 3


class RoutedStream:
    """A request's deltas, from whichever worker holds its model: re-routed when a worker refuses it as
    not resident. Counts the request as running on its model while it is on a worker."""

    def __init__(self, manager: ModelManager, limits: ServerConfig, req_id: str, model: str, prompt_token_ids: list[int],
                 sampling: SamplingParams, arrival_s: float, deadline_s: float | None = None):
        self.manager = manager
        self.limits = limits
        self.req_id = req_id
        self.model = model
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.arrival_s = arrival_s
        self.deadline_s = deadline_s  # time.monotonic() by which the request must be done; None: no deadline
        self.worker: WorkerHandle | None = None
        self.stream: RequestStream | None = None
        self.num_routes = 0

    @property
    def finished(self) -> bool:
        return self.stream is not None and self.stream.finished

    @property
    def num_tokens(self) -> int:
        return self.stream.num_tokens if self.stream is not None else 0

    async def route(self) -> None:
        """Wait for an active worker of the model and submit the request there."""
        wait_s = self.limits.worker_start_timeout_s
        if self.deadline_s is not None:
            wait_s = max(0.001, min(wait_s, self.deadline_s - time.monotonic()))
        try:
            worker = await self.manager.acquire(self.model, len(self.prompt_token_ids), wait_s)
        except Unavailable as exc:
            if self.deadline_s is None or time.monotonic() < self.deadline_s:
                raise  # the worker start timeout, or the model cannot be activated at all
            raise RequestTimeout(f"the request did not finish within {self.limits.request_timeout_s:g} s: {exc.message}") from None
        self.worker, self.num_routes = worker, self.num_routes + 1
        try:
            self.stream = worker.submit(self.req_id, self.model, self.prompt_token_ids, self.sampling, self.arrival_s)
        except WorkerGone as exc:
            self.leave()
            raise Unavailable(f"model {self.model!r} is not available right now ({exc})", retry_after_s=2) from None

    async def next(self) -> TokenDelta:
        delta = await self.stream.next()
        while delta.error_kind == "not_resident" and self.num_tokens == 0 and self.num_routes < ROUTE_ATTEMPTS:
            self.manager.not_resident(self.model, self.worker.worker_id)
            self.leave()
            await self.route()
            delta = await self.stream.next()
        return delta

    def leave(self) -> None:
        """Abort the request on its worker if it is unfinished there, and stop counting it as running."""
        if self.worker is None:
            return
        if not self.finished:
            self.worker.abort(self.req_id)
        self.manager.release(self.model, self.num_tokens)
        self.worker = None


class EngineClient:
    def __init__(self, manager: ModelManager, limits: ServerConfig):
        self.manager = manager
        self.limits = limits

    @contextlib.asynccontextmanager
    async def open_stream(self, req_id: str, model: str, prompt_token_ids: list[int], sampling: SamplingParams,
                          deadline_s: float | None = None) -> AsyncIterator[RoutedStream]:
        self._admit(model)
        stream = RoutedStream(self.manager, self.limits, req_id, model, prompt_token_ids, sampling, time.time(), deadline_s)
        await stream.route()  # counted as waiting from its first line on, before any await: the limits see it
        try:
            yield stream
        finally:
            stream.leave()

    def _admit(self, model: str) -> None:
        runtime = self.manager.runtimes.get(model)
        if runtime is None:
            raise Unavailable(f"model {model!r} was removed", retry_after_s=1)
        total = self.manager.num_in_flight
        if total >= self.limits.max_queued_requests:
            raise Overloaded(f"the server has {total} requests in flight; retry later", retry_after_s=1)
        if runtime.num_in_flight >= self.limits.max_queued_per_model:
            raise Overloaded(f"model {model!r} has {runtime.num_in_flight} requests in flight; retry later", retry_after_s=1)
