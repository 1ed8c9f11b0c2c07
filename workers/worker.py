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
from zmq.utils.monitor import recv_monitor_message

from memory import PagePool
from memory.host_store import HostWeightStore
from workers.contract import messages as m
from workers.contract.channel_keys import HANDSHAKE_FAILURES, SECRET_ENV, as_client, channel_keys
from workers.contract.config import WorkerConfig
from workers.contract.gc_heap import GcPauses, freeze_heap
from workers.device_loop import DeviceLoop

logger = logging.getLogger("prism.worker")

HEARTBEAT_INTERVAL_S = 1.0
CONNECTION_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURES
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
    def __init__(self, worker_id: str, device: str, controller_address: str, parent_pid: int | None = None,
                 secret_env: str = SECRET_ENV):
        self.worker_id = worker_id
        self.device = device
        self.parent_pid = parent_pid
        self.controller_address = controller_address
        self.gc_pauses = GcPauses().install()
        self.loop: DeviceLoop | None = None
        self.exit_reason = "shut down"
        self._last_report = 0.0
        self._stop_reason: str | None = None
        secret = os.environ.get(secret_env, "").strip()
        if not secret:
            raise NoConfiguration(f"{secret_env} is not set: a worker joins its controller only with the channel's secret "
                                  "(the value of the variable that the registry's server.worker_secret_env names)")
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, worker_id.encode())
        self._socket.setsockopt(zmq.LINGER, 1000)
        as_client(self._socket, channel_keys(secret))
        self._monitor = self._socket.get_monitor_socket(CONNECTION_EVENTS)
        self._handshaken = False  # the controller accepted this worker's credentials
        self._lost = False  # the connection dropped after that
        self._socket.connect(controller_address)

    def run(self) -> None:
        try:
            self.loop = self._configure()
            logger.info("start-up heap: %s", freeze_heap().describe())  # full collections would walk it every time
            pool = self.loop.pool
            self._send(m.WorkerReady(self.worker_id, self.device, os.getpid(), pool.budget_pages * pool.page_bytes))
            while not self.loop.stopping and self._stop_reason is None and self._controller_alive():
                self._drain_inbox(self.loop.poll_timeout_ms)
                self.loop.step()
                self._report_if_due()
                self._flush()
        finally:
            if self.loop is not None:
                self.loop.close()
                self._flush()
                self._send(m.Goodbye(self.worker_id, os.getpid(), self.exit_reason))
            self._socket.disable_monitor()
            self._monitor.close(0)
            self._socket.close()
            self._context.term()
            self.gc_pauses.uninstall()

    def request_stop(self, reason: str) -> None:
        """Stop at the end of the current turn (from a signal handler): unfinished requests fail, the
        controller is told Goodbye. Before the loop exists there is nothing to finish: exit at once."""
        if self.loop is None:
            raise SystemExit(0)
        self._stop_reason = self.exit_reason = reason

    def _configure(self) -> DeviceLoop:
        """Say Hello, wait for the controller's Configure, build the pool, the store and the loop."""
        self._send(m.Hello(self.worker_id, self.device, os.getpid()))
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + CONFIGURE_TIMEOUT_S
        while self._socket not in dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))):
            if time.monotonic() >= deadline:
                raise NoConfiguration(f"the controller at {self.controller_address} did not answer within {CONFIGURE_TIMEOUT_S:.0f} s")
            self._read_connection_events()
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

    def _read_connection_events(self) -> None:
        """Raise `NoConfiguration` if the controller refused the handshake (another secret: it drops the
        connection before the handshake completes); note a connection made or lost."""
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            refused = kind & HANDSHAKE_FAILURES or (kind == zmq.EVENT_DISCONNECTED and not self._handshaken)
            if refused:
                raise NoConfiguration(f"the controller at {self.controller_address} refused this worker's credentials: its "
                                      "secret is not this worker's (check the variable the registry's server.worker_secret_env names)")
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
            elif kind == zmq.EVENT_DISCONNECTED:
                self._lost = True

    def _controller_alive(self) -> bool:
        if self.parent_pid is not None:
            if os.getppid() != self.parent_pid:
                logger.warning("controller (pid %d) is gone; worker exits", self.parent_pid)
                return False
            return True
        # A worker that joined over the network: the controller is gone when its connection is (a supervisor
        # such as Ray or systemd starts the worker again, and it joins afresh).
        self._read_connection_events()
        if self._lost:
            logger.warning("lost the connection to the controller at %s; worker exits", self.controller_address)
            self.exit_reason = "lost its controller"
            return False
        return True

    def _flush(self) -> None:
        for message in self.loop.take_outbox():
            self._send(message)

    def _send(self, message: m.FromWorker) -> None:
        self._socket.send(m.encode(message))
