"""One error taxonomy, mapped to OpenAI error bodies in one place.

Client errors (4xx) say what the client must change; server errors (5xx) say what failed on our side and
that retrying may help; overload carries Retry-After. Each class's docstring says who acts.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from controller.protocol import ErrorDetail, ErrorResponse


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class InvalidRequest(APIError):
    """The client sent a bad field or value; the client must fix the request."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested output does not fit the model's context; the client must shorten it."""

    code = "context_length_exceeded"


class ModelNotFound(APIError):
    """No such model in the registry; the client must use a name from GET /v1/models."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(APIError):
    """Missing or wrong API key / admin token; the client must authenticate."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RequestTooLarge(APIError):
    """The body is over the configured limit; the client must send less."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(APIError):
    """Too many queued requests; the client should retry after Retry-After seconds."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ActivationBudgetExceeded(Overloaded):
    """The caller has caused its share of cold loads this minute (`server.caller_activations`); it may ask for
    models that are already active now, and for a cold one after Retry-After."""

    code = "activation_budget_exceeded"


class Unavailable(APIError):
    """No worker can serve the model right now (starting, restarting, loading); retry after Retry-After."""

    status = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, param: str | None = None, retry_after_s: float | None = 1.0):
        super().__init__(message, param, retry_after_s)  # a 503 always says when to retry


class RequestTimeout(APIError):
    """The request ran past the server's per-request timeout; the client may retry with less output."""

    status = 504
    type = "timeout"
    code = "timeout"


class WorkerFailed(APIError):
    """The worker serving the request failed (crash or engine error); the client may retry."""

    status = 500
    type = "server_error"
    code = "worker_failed"
