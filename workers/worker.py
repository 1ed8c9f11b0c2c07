"""The worker process: one per device, its channel to the controller around a `DeviceLoop`.

It connects, says `Hello`, and waits for the controller's `Configure` (its whole configuration); then it
builds the device's page pool and its host weight store, says `WorkerReady`, and runs the loop: drain the
inbox into the device loop -> one step -> a report every second -> send what the loop produced. The
socket is all this file adds to the loop; the offline runner and the tests drive the loop without one.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import zmq

from memory import PagePool
from memory.host_store import HostWeightStore
from workers.contract import messages as m
from workers.contract.channel_keys import SECRET_ENV, as_client, channel_keys
from workers.contract.config import WorkerConfig
from workers.contract.gc_heap import GcPauses, freeze_heap
from workers.device_loop import DeviceLoop

logger = logging.getLogger("prism.worker")

HEARTBEAT_INTERVAL_S = 1.0
CONFIGURE_TIMEOUT_S = 60.0  # a controller that does not answer Hello by then is not there


class NoConfiguration(RuntimeError):
    """The controller did not answer the worker's Hello; the worker exits (its supervisor, if any, restarts it)."""


def pool_budget_bytes(config: WorkerConfig, device: str) -> int:
    """The page pool's budget: a CPU worker's from the registry; on a GPU, `gpu_memory_utilization` of the
    card, less what other processes already use, less what stays outside the pool (`gpu_reserved_bytes`)."""
    if device.startswith("cpu"):
        return config.cpu_budget_bytes
    free, total = torch.cuda.mem_get_info()
    return int(config.gpu_memory_utilization * total) - (total - free) - config.gpu_reserved_bytes


def make_pool(device: str, config: WorkerConfig) -> PagePool:
    if device.startswith("cpu"):
        from memory.host_backend import HostBackend

        return PagePool(HostBackend(config.page_bytes), pool_budget_bytes(config, device))
    from memory.cuda_backend import CudaBackend

    torch.cuda.set_device(torch.device(device))
    budget_bytes = pool_budget_bytes(config, device)
    # Every page of a GPU budget is created up front and kept: mapping then never waits for cuMemCreate.
    return PagePool(CudaBackend(device, config.page_bytes), budget_bytes, reserve_pages=budget_bytes // config.page_bytes)


class Worker:
    def __init__(self, worker_id: str, device: str, controller_address: str, parent_pid: int | None = None):
        self.worker_id = worker_id
        self.device = device
        self.parent_pid = parent_pid
        self.gc_pauses = GcPauses().install()
        self.loop: DeviceLoop | None = None
        self._last_report = 0.0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, worker_id.encode())
        self._socket.setsockopt(zmq.LINGER, 1000)
        secret = os.environ.get(SECRET_ENV)
        if not secret:
            raise NoConfiguration(f"{SECRET_ENV} is not set: a worker joins its controller only with the channel's secret")
        as_client(self._socket, channel_keys(secret))
        self._socket.connect(controller_address)

    def run(self) -> None:
        try:
            self.loop = self._configure()
            logger.info("start-up heap: %s", freeze_heap().describe())  # full collections would walk it every time
            pool = self.loop.pool
            self._send(m.WorkerReady(self.worker_id, self.device, os.getpid(), pool.budget_pages * pool.page_bytes))
            while not self.loop.stopping and self._controller_alive():
                self._drain_inbox(self.loop.poll_timeout_ms)
                self.loop.step()
                self._report_if_due()
                self._flush()
        finally:
            if self.loop is not None:
                self.loop.close()
                self._flush()
            self._socket.close()
            self._context.term()
            self.gc_pauses.uninstall()

    def _configure(self) -> DeviceLoop:
        """Say Hello, wait for the controller's Configure, build the pool, the store and the loop."""
        self._send(m.Hello(self.worker_id, self.device, os.getpid()))
        if not self._socket.poll(int(CONFIGURE_TIMEOUT_S * 1000)):
            raise NoConfiguration(f"the controller did not answer within {CONFIGURE_TIMEOUT_S:.0f} s")
        message = m.decode_to_worker(self._socket.recv())
        if not isinstance(message, m.Configure):
            raise NoConfiguration(f"expected Configure from the controller, got {type(message).__name__}")
        config = message.config
        os.environ.setdefault("TRITON_CACHE_DIR", config.compile_cache_dir)  # read at the first compile; an operator's wins
        pool = make_pool(self.device, config)
        pool.replenish_reserve()
        store = HostWeightStore(config.host_store_bytes, Path(config.host_store_dir), config.store_prefix)
        return DeviceLoop(self.worker_id, self.device, pool, store, local_policy=config.local_policy,
                          tpot_target=config.tpot_target, overlap_steps=config.overlap_steps, gc_stats=self.gc_pauses.stats)

    def _drain_inbox(self, timeout_ms: int) -> None:
        if not self._socket.poll(timeout_ms):
            return
        while True:
            try:
                data = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.loop.handle(m.decode_to_worker(data))
            self._flush()  # replies go out as soon as they are made

    def _report_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_report >= HEARTBEAT_INTERVAL_S:
            self._last_report = now
            self.loop.report()

    def _controller_alive(self) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.warning("controller (pid %d) is gone; worker exits", self.parent_pid)
            return False
        return True

    def _flush(self) -> None:
        for message in self.loop.take_outbox():
            self._send(message)

    def _send(self, message: m.FromWorker) -> None:
        self._socket.send(m.encode(message))
