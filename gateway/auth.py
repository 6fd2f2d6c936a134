"""Client authentication with gateway keys (the upstream key never leaves the gateway)."""

from __future__ import annotations

from arbitrage.errors import AuthenticationError
from arbitrage.keys import KeyStore

DEV_KEY_ID = "dev"


class Authenticator:
    """Checks ``Authorization: Bearer <gateway key>``; in dev mode any key (or none) passes."""

    def __init__(self, keys: KeyStore, dev: bool) -> None:
        self.keys = keys
        self.dev = dev

    def authenticate(self, authorization: str | None) -> str:
        """The key id of the presented key; raises AuthenticationError otherwise."""
        if self.dev:
            return DEV_KEY_ID
        if not authorization:
            raise AuthenticationError(
                "Missing gateway key: send 'Authorization: Bearer <key>' (create one with 'arbitrage keys create').",
                code="missing_api_key",
            )
        scheme, _, secret = authorization.partition(" ")
        entry = self.keys.lookup(secret.strip()) if scheme.lower() == "bearer" else None
        if entry is None:
            raise AuthenticationError("Incorrect gateway key provided.", code="invalid_api_key")
        return entry.id
