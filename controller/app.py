"""The FastAPI application: lifespan owns the Server; errors become OpenAI error bodies in one place."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.auth import Auth
from controller.errors import APIError, InvalidRequest, RequestTooLarge
from controller.protocol import FieldError
from controller.registry import Registry
from controller.routes import admin_routes, openai_routes
from controller.server import Server
from controller.serving import ClientDisconnected

logger = logging.getLogger("prism.controller")

_STATUS_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def create_app(registry: Registry, cache_dir: Path, server: Server | None = None, registry_path: Path | None = None) -> FastAPI:
    """The app for a registry; `server` may be passed prebuilt (its catalog prepared), else it is built."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv = server or Server.from_registry(registry, cache_dir, registry_path)
        await srv.start()
        app.state.server = srv
        try:
            yield
        finally:
            await srv.stop()

    app = FastAPI(title="prism-serve", version="0.1.0", lifespan=lifespan)
    app.state.auth = Auth(registry.server)
    app.add_middleware(BodySizeLimit, max_bytes=registry.server.max_body_bytes)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    _install_error_handlers(app)
    _document_errors_as_400(app)
    return app


def _document_errors_as_400(app: FastAPI) -> None:
    """FastAPI documents validation errors as 422; we answer them as OpenAI does (400, OpenAI error body)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {"description": "invalid request", "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # Drop pydantic's union-member tags (e.g. 'str', 'list[int]') from the location.
        loc = [p for p in loc if not (p in {"str", "int", "float", "bool"} or "[" in p or p.startswith("function-"))]
        field = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        error = (first.get("ctx") or {}).get("error")
        if isinstance(error, FieldError):  # a model validator's refusal of one field: name it
            field, message = error.field, str(error)
        elif first.get("type") == "json_invalid":
            message, field = "the body is not valid JSON", None
        elif first.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}"
        elif first.get("type") == "missing":
            message = f"missing required field {field!r}"
        elif field:
            message = f"{field}: {message.removeprefix('Value error, ')}"
        else:
            message = message.removeprefix("Value error, ")
        return InvalidRequest(message, param=field).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail))
        error.status = exc.status_code
        error.type = _STATUS_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        response = error.response()
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError("internal server error (logged on the server)").response()


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length or while reading."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = RequestTooLarge(f"the request body is over the limit of {self.max_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        if declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # A body without a length (chunked): read it here, up to the limit, and hand it on whole. Refused
            # while the app parses it, it would be a parse error (400), not a 413.
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                body += message.get("body", b"")
                if len(body) > self.max_bytes:
                    return await too_large.response()(scope, receive, send)
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        return await self.app(scope, limited_receive, send)
