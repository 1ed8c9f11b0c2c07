"""The controller's end of the worker channels: one ZMQ ROUTER socket that every worker connects to.

Each worker connects a DEALER socket with its id as identity; messages are msgpack-encoded typed structs
(workers/contract/messages.py). One receive task routes each incoming message to the handler of its worker.
Every connection is CURVE-encrypted with keys derived from the channel's secret (workers/contract/
channel_keys.py): a peer without it cannot connect, so it cannot take over a worker's identity either.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from workers.contract import messages as m
from workers.contract.channel_keys import as_server, channel_keys

logger = logging.getLogger("prism.controller")

Handler = Callable[[m.FromWorker], None]


class WorkerChannel:
    def __init__(self, host: str = "127.0.0.1", secret: str | None = None):
        self.secret = secret or secrets.token_urlsafe(32)  # handed to the workers it spawns, in their environment
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity (it has the secret)
        self._socket.setsockopt(zmq.LINGER, 0)
        as_server(self._socket, channel_keys(self.secret))
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._handlers: dict[bytes, Handler] = {}
        self._task: asyncio.Task | None = None

    def register(self, worker_id: str, handler: Handler) -> None:
        self._handlers[worker_id.encode()] = handler

    def start(self) -> None:
        self._task = asyncio.create_task(self._receive_loop(), name="worker-channel")

    def send(self, worker_id: str, message: m.ToWorker) -> None:
        # ROUTER sends never block: a message to a worker that is gone is dropped, and the worker's
        # supervisor fails its requests.
        self._socket.send_multipart([worker_id.encode(), m.encode(message)], copy=False)

    async def _receive_loop(self) -> None:
        while True:
            identity, data = await self._socket.recv_multipart()
            try:
                message = m.decode_from_worker(data)
            except msgspec.DecodeError:
                logger.error("undecodable message from worker %r dropped", identity)
                continue
            handler = self._handlers.get(identity)
            if handler is not None:
                handler(message)
            else:
                logger.warning("message from unknown worker %r dropped", identity)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._socket.close(0)
        self._context.term()
