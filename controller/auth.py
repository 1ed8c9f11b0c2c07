"""API keys for the OpenAI routes and a separate token for the admin routes, both read from environment
variables that the registry names (secrets stay out of the registry file).

No API keys configured means the OpenAI routes are open (a warning is logged when the server listens on a
non-loopback address). No admin token configured means the admin routes are disabled.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os

from fastapi import Request

from controller.errors import APIError, Unauthorized
from controller.registry import ServerConfig

logger = logging.getLogger("prism.controller")


class AdminDisabled(APIError):
    """No admin token is configured; the operator must set the variable named by server.admin_token_env."""

    status = 403
    type = "permission_error"
    code = "admin_disabled"


class Auth:
    def __init__(self, server: ServerConfig, environ: dict | None = None):
        environ = os.environ if environ is None else environ
        self.api_keys = api_keys(server, environ)
        self.admin_token = environ.get(server.admin_token_env, "").strip() if server.admin_token_env else ""
        self.admin_token_env = server.admin_token_env
        if not self.api_keys and not is_loopback(server.host):
            logger.warning("no API keys configured and listening on %s: the OpenAI API is open to the network", server.host)

    def check_api_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        given = _bearer(request)
        if given is None or not any(_same(given, key) for key in self.api_keys):
            raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)")

    def check_admin(self, request: Request) -> None:
        if not self.admin_token:
            hint = f"set the environment variable {self.admin_token_env}" if self.admin_token_env else "set server.admin_token_env in the registry"
            raise AdminDisabled(f"the admin API is disabled: {hint}")
        given = _bearer(request)
        if given is None or not _same(given, self.admin_token):
            raise Unauthorized("missing or invalid admin token (send Authorization: Bearer <token>)")


def api_keys(server: ServerConfig, environ: dict | None = None) -> list[str]:
    """The API keys in the variable `server.api_keys_env` names (comma-separated); [] when none."""
    environ = os.environ if environ is None else environ
    raw = environ.get(server.api_keys_env, "") if server.api_keys_env else ""
    return [k.strip() for k in raw.split(",") if k.strip()]


def bearer(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header, if there is one."""
    return _bearer(request)


def _same(given: str, secret: str) -> bool:
    """Constant-time comparison of bytes: `compare_digest` refuses str with non-ASCII characters (TypeError),
    and a header may carry any byte (Starlette decodes it as latin-1)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode("utf-8", "surrogateescape"))


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def require_api_key(request: Request) -> None:
    request.app.state.auth.check_api_key(request)


async def require_admin(request: Request) -> None:
    request.app.state.auth.check_admin(request)
