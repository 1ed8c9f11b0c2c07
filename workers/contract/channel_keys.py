"""The channel's CURVE keys: every connection between the controller and a worker is encrypted and
authenticated with keys derived from one shared secret.

The controller makes a secret when it starts (or, for workers it does not spawn, an operator gives both
sides the same one) and hands it to the workers it spawns in their environment (`SECRET_ENV`), never on
a command line. The server's long-term public key is derived from the secret and never sent, so a peer
without the secret cannot complete the handshake: it can neither connect as a worker, take over a
connected worker's identity, nor read what the controller sends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import zmq
from zmq.utils import z85

SECRET_ENV = "PRISM_WORKER_SECRET"
# Socket-monitor events of a handshake that failed: the peer has no secret, or another one.
HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


@dataclass(frozen=True)
class ChannelKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def channel_keys(secret: str) -> ChannelKeys:
    if not secret:
        raise ValueError("the channel secret is empty")
    if not zmq.has("curve"):
        raise RuntimeError("this pyzmq was built without CURVE security; install the pyzmq wheel from PyPI")

    def pair(role: str) -> tuple[bytes, bytes]:
        secret_key = z85.encode(hashlib.sha256(f"prism-channel-{role}:{secret}".encode()).digest())
        return zmq.curve_public(secret_key), secret_key

    server_public, server_secret = pair("controller")
    client_public, client_secret = pair("worker")
    return ChannelKeys(server_public, server_secret, client_public, client_secret)


def as_server(socket: zmq.Socket, keys: ChannelKeys) -> None:
    """Make a socket the CURVE server (before it binds)."""
    socket.curve_secretkey = keys.server_secret
    socket.curve_publickey = keys.server_public
    socket.curve_server = True


def as_client(socket: zmq.Socket, keys: ChannelKeys) -> None:
    """Make a socket a CURVE client of the controller (before it connects)."""
    socket.curve_serverkey = keys.server_public
    socket.curve_publickey = keys.client_public
    socket.curve_secretkey = keys.client_secret
