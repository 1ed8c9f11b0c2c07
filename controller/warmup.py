"""The server's own first request, made before the port opens, so that no client's request is the first.

A server's first request pays what no later one does: modules imported on first use (anyio's streams, for
the first streamed response), pydantic and FastAPI building validators, the worker's first step and
first sampling (on a 2-core CPU, py-spy found these in the first request's profile and in no later one's).

So, once the port accepts connections and before "listening" is printed (controller/http_server.py), the
server sends itself one streamed completion and one streamed chat request (if the model has a chat
template) for an active model, over its own port: two tokens each, greedy. They carry
`OpenAIServing.warmup_token`, so they are left out of the metrics. Nothing active: nothing to warm (the
first cold request then pays these costs too). A failure is logged and start-up goes on.
"""

from __future__ import annotations

import logging
import time

import httpx

from controller.serving import WARMUP_HEADER
from scheduler.cluster import ModelState

logger = logging.getLogger("prism.controller")

WARMUP_TIMEOUT_S = 60.0


async def warm_up(app, server, base_url: str | None = None) -> None:
    """`base_url`: over the network to the server's own port (uvicorn's side warmed too); None: in process."""
    active = [name for name, runtime in server.manager.runtimes.items() if runtime.state is ModelState.ACTIVE]
    if not active:
        logger.info("warm-up skipped: no model is active yet")
        return
    model = active[0]
    headers = {WARMUP_HEADER: server.serving.warmup_token}
    keys = app.state.auth.api_keys
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    requests = [("/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 2, "stream": True, "temperature": 0})]
    if server.manager.entries[model].tokenizer.has_chat_template:
        requests.append(("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                                                   "max_tokens": 2, "stream": True, "temperature": 0}))
    started = time.perf_counter()
    try:
        transport = httpx.ASGITransport(app) if base_url is None else None
        async with httpx.AsyncClient(transport=transport, base_url=base_url or "http://prism.warmup", timeout=WARMUP_TIMEOUT_S) as client:
            for path, body in requests:
                async with client.stream("POST", path, json=body, headers=headers) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"{path} answered {response.status_code}: {(await response.aread())[:200]!r}")
                    async for _ in response.aiter_lines():
                        pass
    except Exception as exc:  # a warm-up never stops the server
        logger.warning("warm-up request to %s failed (serving goes on): %s", model, exc)
        return
    logger.info("warm-up: %d request(s) to %s in %.3f s (left out of the metrics)", len(requests), model, time.perf_counter() - started)
