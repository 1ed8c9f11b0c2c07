"""The `prism serve` listening socket."""

from __future__ import annotations

import asyncio
import socket

from controller.cli import listening_socket


def test_connections_accepted_by_the_server_socket_have_nagle_off():
    """Regression (controller benchmark, CPU): with Nagle on, every request after a connection's first
    waited ~40 ms for the client's delayed ACK before the response body went out."""

    async def accepted_nodelay() -> int:
        sock = listening_socket("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            result = await asyncio.wait_for(seen, 10)
            writer.close()
        return result

    assert listening_socket("127.0.0.1", 0).proto == socket.IPPROTO_TCP
    assert asyncio.run(accepted_nodelay()) != 0
