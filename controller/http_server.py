"""The HTTP side of `prism serve`: its socket, and a uvicorn server that says when the port accepts."""

from __future__ import annotations

import socket

import uvicorn

from controller.warmup import warm_up


class AnnouncingServer(uvicorn.Server):
    """Prints `line` once the port accepts connections: after the lifespan's start-up (the workers
    connected), when uvicorn has begun serving the socket. "listening" used to be printed before the
    start-up, about 9 s before the demo's port accepted a connection."""

    def __init__(self, config: uvicorn.Config, line: str):
        super().__init__(config)
        self.line = line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started:
            return
        if sockets:  # the server's first request is its own, not a client's (controller/warmup.py)
            app = self.config.app
            await warm_up(app, app.state.server, "http://" + _loopback_address(sockets[0]))
        print(self.line, flush=True)


def _loopback_address(sock: socket.socket) -> str:
    """host:port to reach a listening socket from this host (a wildcard address through loopback)."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_socket(host: str, port: int) -> socket.socket:
    """The HTTP server's socket, bound (port 0: a free one).

    Made with protocol IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    connections whose socket says TCP. With Nagle on, a response written in two parts (headers, body)
    waited for the client's delayed ACK: about 40 ms on every request after a connection's first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock
