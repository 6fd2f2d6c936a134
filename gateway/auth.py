"""Client authentication with gateway keys (the upstream key never leaves the gateway), and roles.

Every endpoint but ``/healthz`` needs a gateway key. The OpenAI endpoints (and the
OpenAPI document) take ``client`` and ``admin`` keys; ``/metrics`` takes ``metrics``
and ``admin`` keys, so a scrape token found in a Prometheus config cannot spend
money; ``/admin/...`` takes ``admin`` keys only. Guard a route with ``guards=[require_admin]`` (or
``require_role("metrics")``); the handler then finds the caller's ``KeyEntry`` in
``request.state.key``.
"""

from __future__ import annotations

from typing import Callable

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from arbitrage.errors import AuthenticationError, PermissionDeniedError
from arbitrage.keys import KeyEntry, KeyStore

DEV_KEY_ID = "dev"
DEV_KEY = KeyEntry(DEV_KEY_ID, "dev", "", "", role="admin")
"""Who a caller is in dev mode (loopback only): anyone, with every right and no limit."""


class Authenticator:
    """Checks ``Authorization: Bearer <gateway key>``; in dev mode any key (or none) passes."""

    def __init__(self, keys: KeyStore, dev: bool) -> None:
        self.keys = keys
        self.dev = dev

    def identify(self, authorization: str | None, role: str = "client") -> KeyEntry:
        """The entry of the presented key (role and limits): AuthenticationError (401) for a missing or
        unknown key, PermissionDeniedError (403) for a key without ``role``."""
        if self.dev:
            return DEV_KEY
        if not authorization:
            raise AuthenticationError(
                "Missing gateway key: send 'Authorization: Bearer <key>' (create one with 'arbitrage keys create').",
                code="missing_api_key",
            )
        scheme, _, secret = authorization.partition(" ")
        entry = self.keys.lookup(secret.strip()) if scheme.lower() == "bearer" else None
        if entry is None:
            raise AuthenticationError("Incorrect gateway key provided.", code="invalid_api_key")
        if not entry.has_role(role):
            raise PermissionDeniedError(f"This endpoint needs a gateway key with the {role!r} role; this key's "
                                        f"role is {entry.role!r}.", code="insufficient_role")
        return entry

    def authenticate(self, authorization: str | None) -> str:
        """The key id of the presented key; raises AuthenticationError otherwise."""
        return self.identify(authorization).id


Guard = Callable[[ASGIConnection, BaseRouteHandler], None]


def require_role(role: str) -> Guard:
    """A litestar guard: the caller's key must have ``role`` (admin keys have every role)."""

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        authorization = connection.headers.get("authorization")
        connection.state.key = connection.app.state.gateway.auth.identify(authorization, role)

    return guard


require_admin = require_role("admin")
"""Guard for ``/admin/...`` routes: ``@post("/admin/x", guards=[require_admin])``."""
require_metrics = require_role("metrics")
"""Guard for ``/metrics``: a ``metrics`` (scrape-only) or ``admin`` key."""
require_client = require_role("client")
"""Guard for anything else (e.g. the OpenAPI document): a ``client`` or ``admin`` key."""
