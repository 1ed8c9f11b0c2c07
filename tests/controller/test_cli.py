"""The `prism serve` listening socket."""

from __future__ import annotations

import asyncio
import socket

from controller.http_server import listening_socket


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


def test_listening_is_printed_once_the_port_accepts_connections_and_the_server_is_warm(tmp_path):
    """Regression: "prism-serve listening on ..." was printed before the workers started, about 9 s before
    the demo's port accepted a connection; a client that believed it got "connection refused". Before it is
    printed now, the server has made its own first request (controller/warmup.py), not counted."""
    import subprocess
    import sys

    import httpx

    from controller.registry import default_registry_path
    from tests.controller.server_process import LISTEN_LINE, ServerProcess, stop_server

    config = tmp_path / "registry.yaml"
    config.write_text(f"""
devices: [cpu]
memory: {{cpu_budget_bytes: 256MiB}}
models:
  - {{name: tiny, load_format: dummy, config: {default_registry_path().parent / 'tiny-llama.json'}, pinned: true}}
""")
    process = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", "--config", str(config), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    server = ServerProcess(process)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            match = LISTEN_LINE.search(line)
            if match:
                break
        assert match, "".join(lines)
        assert any("starting on http://" in line for line in lines), "the address is told while the workers start"
        with socket.create_connection((match.group(1).split("//")[1].rsplit(":", 1)[0], int(match.group(1).rsplit(":", 1)[1])), timeout=5):
            pass  # refused before the fix
        assert httpx.get(match.group(1) + "/health", timeout=10).status_code in (200, 503)
        warm = [line for line in lines if "warm-up:" in line]
        assert warm and "request(s) to tiny" in warm[0], "the server's first request was its own, before listening"
        metrics = httpx.get(match.group(1) + "/metrics", timeout=10).text
        assert not [line for line in metrics.splitlines() if line.startswith("prism:requests_total{")], "left out of the metrics"
    finally:
        stop_server(server)
        process.stdout.close()
