"""The controller's resources in one object: worker channel, workers, model manager, serving.

Built from a validated registry and its prepared catalog; `start()` launches one worker per device
(each is sent the registry's worker configuration when it connects) and activates what fits, `stop()`
drains in-flight requests and stops the workers. Tests build it without HTTP.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import time
from pathlib import Path

import msgspec

from controller.auth import api_keys, is_loopback
from controller.caller_budget import ActivationBudget
from controller.catalog import CatalogEntry, build_catalog
from controller.channel import WorkerChannel
from controller.devices import models_beyond_budget, resolve_devices
from controller.engine_client import EngineClient
from controller.events import EventLog
from controller.host_images import STORE_PREFIX, sweep_orphan_images
from controller.metrics import Metrics
from controller.models import ModelManager
from controller.ray_launcher import RayLauncher
from controller.registry import DEVICE_NAME, Registry
from controller.registry_ops import RegistryOps
from controller.serving import OpenAIServing
from controller.worker_handle import WorkerHandle
from workers.contract.gc_heap import GcPauses
from workers.contract.messages import GcStats, Hello

logger = logging.getLogger("prism.controller")

RAY_START_TIMEOUT_S = 300.0  # connecting to (or starting) the cluster and creating the actors


class Server:
    def __init__(self, registry: Registry, catalog: dict[str, CatalogEntry], cache_dir: Path, registry_path: Path | None = None,
                 log_format: str = "text"):
        self.registry = registry
        self._catalog = catalog  # handed to the model manager at start; from then on its table holds the models
        self.cache_dir = cache_dir
        self.registry_path = registry_path
        self.devices = resolve_devices(registry.devices)
        self.beyond_budget = models_beyond_budget(registry, catalog, self.devices)
        for model in registry.models:
            if model.device is not None and model.device not in self.devices:
                raise ValueError(f"model {model.name!r} asks for device {model.device!r}, which is not in `devices` {self.devices}")
        self._secret = self.channel_secret()
        self.store_prefix = STORE_PREFIX.format(pid=os.getpid())
        self.log_format = log_format
        self.channel: WorkerChannel | None = None
        self.launcher: RayLauncher | None = None
        self.workers: dict[str, WorkerHandle] = {}
        self.events = EventLog()
        self.gc_pauses = GcPauses()
        self.metrics = Metrics(self._metric_state, self._gc_state)
        self.manager: ModelManager | None = None
        self.client: EngineClient | None = None
        self.serving: OpenAIServing | None = None

        self.registry_ops = RegistryOps(self)

    @classmethod
    def from_registry(cls, registry: Registry, cache_dir: Path, registry_path: Path | None = None) -> Server:
        return cls(registry, build_catalog(registry, cache_dir), cache_dir, registry_path)

    async def start(self) -> None:
        await self.build()
        await self.launch()

    async def build(self) -> None:
        """Everything but the worker processes: the channel (listening), the handles, the model manager,
        serving. The in-process HTTP tests stop here: requests are validated and mapped to errors as
        served, and a request that needs a worker waits for one that is never started."""
        self.gc_pauses.install()
        sweep_orphan_images(self.registry.memory.host_store_dir)
        server = self.registry.server
        self.channel = WorkerChannel(server.worker_listen_host, server.worker_listen_port, self._secret)
        self.channel.on_unknown = self._on_unknown_worker
        self.channel.start()
        joinable = "workers with its secret can join" if server.worker_secret_env else "only the workers it spawns can join"
        logger.info("worker channel listening on %s (%s)", self.channel.address, joinable)
        self.worker_config = self.registry.worker_config(self.store_prefix, self.cache_dir)
        for device in self.devices:
            self.workers[device] = WorkerHandle(device, device, self.channel, self.worker_config, self.log_format,
                                                standby=server.wants_standby(device))
        self.manager = ModelManager(self.registry, self._catalog, self.workers, self.metrics, self.events)
        for name, why in self.beyond_budget.items():  # its requests fail at once, saying why, instead of waiting
            logger.error("model %s cannot be served here: %s", name, why)
            self.manager.runtimes[name].error = why
        self._catalog = None
        self.client = EngineClient(self.manager, self.registry.server)
        self.serving = OpenAIServing(self.manager, self.client, self.registry.server, self.metrics, self._activation_budget())

    def _activation_budget(self) -> ActivationBudget | None:
        server = self.registry.server
        budget = server.caller_activations
        exposed = bool(api_keys(server)) or not is_loopback(server.host)  # tenants, or anyone on the network
        if budget.enabled == "never" or (budget.enabled == "auto" and not exposed):
            return None
        return ActivationBudget(budget.per_minute, budget.burst)

    def channel_secret(self) -> str | None:
        """The operator's channel secret (`server.worker_secret_env`); None: the channel makes one."""
        name = self.registry.server.worker_secret_env
        if name is None:
            return None
        secret = os.environ.get(name, "").strip()
        if not secret:
            raise ValueError(f"server.worker_secret_env names {name}, which is not set: set it to the secret that "
                             "workers joining this controller are given")
        return secret

    def _on_unknown_worker(self, worker_id: str, message) -> None:
        """A worker this controller did not spawn: one that says Hello joins (it passed the channel's
        handshake, so it has the secret); anything else from an unknown id is dropped."""
        if not isinstance(message, Hello):
            logger.warning("message from unknown worker %r dropped (a worker says Hello first)", worker_id)
            return
        if message.worker_id != worker_id or not DEVICE_NAME.fullmatch(message.device) or self.manager is None:
            logger.error("worker %r refused: its Hello names id %r and device %r (ids must match; devices are cpu, cpu:N "
                         "or cuda:N)", worker_id, message.worker_id, message.device)
            return
        launched = self.launcher is not None and worker_id in self.launcher.worker_ids
        handle = WorkerHandle(worker_id, message.device, self.channel, self.worker_config, self.log_format, remote=True,
                              heartbeat_timeout_s=self.registry.server.worker_heartbeat_timeout_s,
                              shutdown_on_stop=not launched)  # Ray's actors are killed, and their workers with them
        self.workers[worker_id] = handle
        handle.on_leave = self._on_worker_left
        self.manager.adopt(handle)
        self.events.add("worker_joined", None, worker_id, detail=f"{message.device}, pid {message.pid}")
        logger.info("worker %s joins from the network (%s, pid %d)", worker_id, message.device, message.pid)
        asyncio.get_running_loop().create_task(handle.start())
        handle.on_message(message)

    def _on_worker_left(self, handle: WorkerHandle) -> None:
        self.workers.pop(handle.worker_id, None)
        self.channel.unregister(handle.worker_id)
        self.events.add("worker_left", None, handle.worker_id, detail=handle.device)
        self.manager.forget_worker(handle)

    async def launch(self) -> None:
        """Start one worker process per device and the Ray workers, if any; then activate what fits."""
        await asyncio.gather(*(worker.start() for worker in self.workers.values()))
        if self.registry.ray is not None:
            self.launcher = RayLauncher(self.registry.ray, self.channel.address, self.channel.secret)
            await asyncio.to_thread(self.launcher.start, RAY_START_TIMEOUT_S)
        await self.manager.start()

    def health(self) -> dict:
        runtimes = self.manager.runtimes if self.manager else {}
        models = {name: {"state": r.state.value, "device": r.device, "error": r.error, "preparation": self.manager.preparation(name)}
                  for name, r in runtimes.items()}
        workers = {wid: self._worker_report(w) for wid, w in self.workers.items()}
        restoring = sorted(self.manager.restoring) if self.manager else []
        ok = bool(workers) and all(w["state"] == "ready" for w in workers.values()) and not restoring
        ok = ok and not any(m["error"] for m in models.values())
        preparing = sorted(name for name, m in models.items() if any(p != "prepared" for p in m["preparation"].values()))
        return {"status": "ok" if ok else "degraded", "models": models, "workers": workers, "restoring": restoring, "preparing": preparing}

    def _metric_state(self):
        runtimes = self.manager.runtimes if self.manager else {}
        by_device: dict[str, dict[str, int]] = {d: {} for d in self.workers}
        for model, runtime in runtimes.items():
            if runtime.num_in_flight:
                by_device.setdefault(runtime.device or "none", {})[model] = runtime.num_in_flight
        return [(device, worker.last_heartbeat, by_device.get(device, {})) for device, worker in self.workers.items()]

    def _gc_state(self) -> list[tuple[str, GcStats]]:
        """The garbage collectors of the controller and of every worker (as of its last heartbeat)."""
        state = [("controller", self.gc_pauses.stats())]
        for device, worker in self.workers.items():
            beat = worker.last_heartbeat
            if beat is not None and beat.gc is not None:
                state.append((f"worker:{device}", beat.gc))
        return state

    @staticmethod
    def _worker_report(worker: WorkerHandle) -> dict:
        report = {"state": worker.state, "pid": worker.pid, "standby_pid": worker.standby_pid, "restarts": worker.num_restarts,
                  "device": worker.device, "joined": worker.remote}
        beat = worker.last_heartbeat
        if beat is not None:
            report["pool"] = msgspec.to_builtins(beat.pool)
            report["models"] = {s.name: msgspec.to_builtins(s) for s in beat.models}
            report["heartbeat_age_s"] = round(time.monotonic() - worker.last_heartbeat_s, 3)
        return report

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Let in-flight requests finish (up to `drain_timeout_s`), then stop the workers."""
        if self.manager is not None:
            deadline = time.monotonic() + drain_timeout_s
            while self.manager.num_in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if self.manager is not None:
            await self.manager.stop()
        await asyncio.gather(*(worker.stop() for worker in list(self.workers.values())))
        if self.launcher is not None:
            await asyncio.to_thread(self.launcher.stop)
        if self.channel is not None:
            await self.channel.close()
        self.gc_pauses.uninstall()
        for path in glob.glob(str(self.registry.memory.host_store_dir / f"{self.store_prefix}*")):  # this server's weight images
            Path(path).unlink(missing_ok=True)
