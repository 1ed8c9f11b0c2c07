"""The controller's door to the workers: admission limits, routing to the model's worker, abort on exit.

`open_stream` is an async context manager: inside it the request runs on a worker; leaving it early
(client gone, stop string found, timeout, error) aborts the request on the worker, which frees its KV.
A request for a model that is not active waits for the model manager to activate it (the wait counts
in TTFT) up to `worker_start_timeout_s`, then gets 503.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import AsyncIterator

from controller.errors import Overloaded, Unavailable
from controller.models import ModelManager
from controller.registry import ServerConfig
from controller.worker_handle import RequestStream, WorkerGone
from workers.messages import SamplingParams


class EngineClient:
    def __init__(self, manager: ModelManager, limits: ServerConfig):
        self.manager = manager
        self.limits = limits
        self.in_flight: Counter[str] = Counter()

    @property
    def num_in_flight(self) -> int:
        return sum(self.in_flight.values())

    @contextlib.asynccontextmanager
    async def open_stream(self, req_id: str, model: str, prompt_token_ids: list[int], sampling: SamplingParams) -> AsyncIterator[RequestStream]:
        arrival_s = time.time()
        self._admit(model)
        try:
            worker = await self.manager.acquire(model, len(prompt_token_ids), self.limits.worker_start_timeout_s)
            stream = None
            try:
                stream = worker.submit(req_id, model, prompt_token_ids, sampling, arrival_s)
                yield stream
            except WorkerGone as exc:
                raise Unavailable(f"model {model!r} is not available right now ({exc})", retry_after_s=2) from None
            finally:
                if stream is not None and not stream.finished:
                    worker.abort(req_id)
                self.manager.release(model, stream_tokens(stream))
        finally:
            self.in_flight[model] -= 1

    def _admit(self, model: str) -> None:
        if model not in self.manager.runtimes:
            raise Unavailable(f"model {model!r} was removed", retry_after_s=1)
        if self.num_in_flight >= self.limits.max_queued_requests:
            raise Overloaded(f"the server has {self.num_in_flight} requests in flight; retry later", retry_after_s=1)
        if self.in_flight[model] >= self.limits.max_queued_per_model:
            raise Overloaded(f"model {model!r} has {self.in_flight[model]} requests in flight; retry later", retry_after_s=1)
        self.in_flight[model] += 1


def stream_tokens(stream: RequestStream | None) -> int:
    return stream.num_tokens if stream is not None else 0
