"""The controller's door to the workers: admission limits, routing to the model's worker, abort on exit.

`open_stream` is an async context manager: inside it the request runs on a worker; leaving it early
(client gone, stop string found, timeout, error) aborts the request on the worker, which frees its KV.
Requests for a model whose worker is (re)starting or still loading it wait for it (their wait counts in
TTFT) up to `worker_start_timeout_s`, then get 503.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import AsyncIterator

from controller.catalog import CatalogEntry
from controller.errors import Overloaded, Unavailable
from controller.registry import ServerConfig
from controller.worker_handle import RequestStream, WorkerHandle
from workers.messages import SamplingParams


class EngineClient:
    def __init__(self, catalog: dict[str, CatalogEntry], workers: dict[str, WorkerHandle], placement: dict[str, str], limits: ServerConfig):
        self.catalog = catalog
        self.workers = workers
        self.placement = placement  # model -> worker id
        self.limits = limits
        self.in_flight: Counter[str] = Counter()

    @property
    def num_in_flight(self) -> int:
        return sum(self.in_flight.values())

    def worker_for(self, model: str) -> WorkerHandle:
        return self.workers[self.placement[model]]

    @contextlib.asynccontextmanager
    async def open_stream(self, req_id: str, model: str, prompt_token_ids: list[int], sampling: SamplingParams) -> AsyncIterator[RequestStream]:
        arrival_s = time.time()
        self._admit(model)
        try:
            worker = self.worker_for(model)
            if not await worker.wait_model_ready(model, self.limits.worker_start_timeout_s):
                slot = worker.slots[model]
                detail = f"loading it failed: {slot.error}" if slot.error else f"worker {worker.worker_id} is {worker.state}"
                raise Unavailable(f"model {model!r} is not available right now ({detail})", retry_after_s=5)
            stream = worker.submit(req_id, model, prompt_token_ids, sampling, arrival_s)
            try:
                yield stream
            finally:
                if not stream.finished:
                    worker.abort(req_id)
        finally:
            self.in_flight[model] -= 1

    def _admit(self, model: str) -> None:
        if self.num_in_flight >= self.limits.max_queued_requests:
            raise Overloaded(f"the server has {self.num_in_flight} requests in flight; retry later", retry_after_s=1)
        if self.in_flight[model] >= self.limits.max_queued_per_model:
            raise Overloaded(f"model {model!r} has {self.in_flight[model]} requests in flight; retry later", retry_after_s=1)
        self.in_flight[model] += 1
