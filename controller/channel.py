"""The controller's end of the worker channels: one ZMQ ROUTER socket that every worker connects to.

Each worker connects a DEALER socket with its id as identity; messages are msgpack-encoded typed structs
(workers/contract/messages.py). One receive task routes each incoming message to the handler of its worker;
a message from an identity no handler is registered for goes to `on_unknown` (a worker joining over the
network says Hello that way). Every connection is CURVE-encrypted with keys derived from the channel's
secret (workers/contract/channel_keys.py): a peer without it cannot connect, so it cannot take over a
worker's identity either; a failed handshake is logged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Callable

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from workers.contract import messages as m
from workers.contract.channel_keys import HANDSHAKE_FAILURES, as_server, channel_keys

logger = logging.getLogger("prism.controller")

Handler = Callable[[m.FromWorker], None]
UnknownHandler = Callable[[str, m.FromWorker], None]  # (the sender's identity, its message)

REFUSAL_LOG_INTERVAL_S = 10.0


class WorkerChannel:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, secret: str | None = None):
        """Listen on `host:port` (0: a free port). `secret`: the operator's, for workers that join over the
        network; None: a random one, handed only to the workers this controller spawns."""
        self.secret = secret or secrets.token_urlsafe(32)  # handed to the workers it spawns, in their environment
        self.on_unknown: UnknownHandler | None = None
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity (it has the secret)
        self._socket.setsockopt(zmq.LINGER, 0)
        as_server(self._socket, channel_keys(self.secret))
        self._monitor = self._socket.get_monitor_socket(HANDSHAKE_FAILURES)
        endpoint = f"tcp://[{host}]" if ":" in host else f"tcp://{host}"
        if ":" in host:
            self._socket.setsockopt(zmq.IPV6, 1)
        if port:
            self._socket.bind(f"{endpoint}:{port}")
        else:
            port = self._socket.bind_to_random_port(endpoint)
        self.address = f"{endpoint}:{port}"
        self._handlers: dict[bytes, Handler] = {}
        self._tasks: list[asyncio.Task] = []

    def register(self, worker_id: str, handler: Handler) -> None:
        self._handlers[worker_id.encode()] = handler

    def unregister(self, worker_id: str) -> None:
        self._handlers.pop(worker_id.encode(), None)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive_loop(), name="worker-channel"),
                       asyncio.create_task(self._watch_handshakes(), name="worker-channel-handshakes")]

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
            elif self.on_unknown is not None:
                self.on_unknown(identity.decode(errors="replace"), message)
            else:
                logger.warning("message from unknown worker %r dropped", identity)

    async def _watch_handshakes(self) -> None:
        """Log peers that failed the CURVE handshake (no secret, or another one): the first at once, then at
        most one line per `REFUSAL_LOG_INTERVAL_S` with how many (a refused peer may retry many times a second)."""
        refused, logged_s = 0, -REFUSAL_LOG_INTERVAL_S
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            refused += 1
            now = time.monotonic()
            if now - logged_s >= REFUSAL_LOG_INTERVAL_S:
                logger.warning("worker channel: %d connection(s) on %s failed the handshake (%s): the peer does not have this "
                               "controller's secret; refused", refused, event["endpoint"].decode(errors="replace"),
                               zmq.Event(event["event"]).name)
                refused, logged_s = 0, now

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._socket.disable_monitor()
        self._monitor.close(0)
        self._socket.close(0)
        self._context.term()
