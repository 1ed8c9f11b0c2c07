"""Large JSON bodies parsed on a thread: a request body of megabytes (a prompt of a million token ids) took
json.loads about 0.1 s on the event loop, during which no other request, /health included, was answered."""

from __future__ import annotations

import json
from typing import Any, Callable

import anyio
from fastapi import Request
from fastapi.routing import APIRoute

INLINE_BODY_BYTES = 64 * 1024  # smaller bodies parse in microseconds: a thread hop would cost more


class OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = json.loads(body) if len(body) <= INLINE_BODY_BYTES else await anyio.to_thread.run_sync(json.loads, body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    """A route whose request body, when large, is parsed off the event loop (FastAPI's "custom Request class")."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def off_loop_handler(request: Request):
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return off_loop_handler
