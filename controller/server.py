"""The controller's resources in one object: catalog, worker channel, workers, engine client, serving.

Built from a validated registry; `start()` launches one worker per device and places the models on them,
`stop()` drains in-flight requests and stops the workers. Tests build it without HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgspec

from controller.catalog import CatalogEntry, build_catalog
from controller.channel import WorkerChannel
from controller.engine_client import EngineClient
from controller.metrics import Metrics
from controller.registry import Registry
from controller.serving import OpenAIServing
from controller.worker_handle import WorkerHandle

logger = logging.getLogger("prism.controller")


def resolve_devices(devices: list[str] | str) -> list[str]:
    if devices != "auto":
        return list(devices)
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no usable CUDA: serve on the CPU
        count = 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def place_models(registry: Registry, devices: list[str]) -> dict[str, str]:
    """Static placement: a model's `device` if it names one, else round-robin over the devices."""
    placement = {}
    for index, model in enumerate(registry.models):
        if model.device is not None and model.device not in devices:
            raise ValueError(f"model {model.name!r} asks for device {model.device!r}, which is not in `devices` {devices}")
        placement[model.name] = model.device or devices[index % len(devices)]
    return placement


class Server:
    def __init__(self, registry: Registry, catalog: dict[str, CatalogEntry]):
        self.registry = registry
        self.catalog = catalog
        self.devices = resolve_devices(registry.devices)
        self.placement = place_models(registry, self.devices)
        self.channel: WorkerChannel | None = None
        self.workers: dict[str, WorkerHandle] = {}
        self.client: EngineClient | None = None
        self.serving: OpenAIServing | None = None
        self.metrics = Metrics(self._metric_state)

    @classmethod
    def from_registry(cls, registry: Registry, cache_dir: Path) -> Server:
        return cls(registry, build_catalog(registry, cache_dir))

    async def start(self) -> None:
        memory = self.registry.memory
        self.channel = WorkerChannel()
        self.channel.start()
        for device in self.devices:
            budget = int(memory.cpu_budget_bytes) if device == "cpu" else 0
            self.workers[device] = WorkerHandle(device, device, self.channel, budget, int(memory.page_bytes))
        for model, device in self.placement.items():
            self.workers[device].place(self.catalog[model].spec(device, memory.block_size))
        await asyncio.gather(*(worker.start() for worker in self.workers.values()))
        self.client = EngineClient(self.catalog, self.workers, self.placement, self.registry.server)
        self.serving = OpenAIServing(self.catalog, self.client, self.registry.server, self.metrics)

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every model is loaded on its worker."""
        checks = [self.workers[d].wait_model_ready(m, timeout_s) for m, d in self.placement.items()]
        return all(await asyncio.gather(*checks))

    def health(self) -> dict:
        models = {}
        for model, device in self.placement.items():
            worker = self.workers.get(device)
            slot = worker.slots.get(model) if worker else None
            models[model] = "ready" if slot and slot.ready.is_set() else ("failed" if slot and slot.error else "loading")
        workers = {wid: self._worker_report(w) for wid, w in self.workers.items()}
        ok = all(state == "ready" for state in models.values())
        return {"status": "ok" if ok else "degraded", "models": models, "workers": workers}

    def _metric_state(self):
        in_flight = self.client.in_flight if self.client else {}
        by_device: dict[str, dict[str, int]] = {d: {} for d in self.workers}
        for model, count in in_flight.items():
            by_device.setdefault(self.placement.get(model, "?"), {})[model] = count
        return [(device, worker.last_heartbeat, by_device.get(device, {})) for device, worker in self.workers.items()]

    @staticmethod
    def _worker_report(worker: WorkerHandle) -> dict:
        report = {"state": worker.state, "pid": worker.pid, "restarts": worker.num_restarts, "device": worker.device}
        beat = worker.last_heartbeat
        if beat is not None:
            report["pool"] = msgspec.to_builtins(beat.pool)
            report["models"] = {s.name: msgspec.to_builtins(s) for s in beat.models}
            report["heartbeat_age_s"] = round(time.monotonic() - worker.last_heartbeat_s, 3)
        return report

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Let in-flight requests finish (up to `drain_timeout_s`), then stop the workers."""
        if self.client is not None:
            deadline = asyncio.get_running_loop().time() + drain_timeout_s
            while self.client.num_in_flight and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        await asyncio.gather(*(worker.stop() for worker in self.workers.values()))
        if self.channel is not None:
            await self.channel.close()
