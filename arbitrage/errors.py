"""The one error hierarchy of arbitrage.

Tree::

    ArbitrageError                  anything arbitrage raises on purpose
    ├── ConfigError                 bad config file, flag or environment (at start)
    ├── StoreError                  capture store unreadable or unwritable
    │   └── MigrationError          a schema migration failed or is unknown
    ├── TrainingError               a training run ended without an adapter (its loss diverged)
    └── APIError                    becomes an OpenAI-shaped JSON error response
        ├── InvalidRequestError     400  malformed JSON, wrong types, bad header
        ├── AuthenticationError     401  missing or unknown gateway key
        ├── PermissionDeniedError   403  the key's role does not allow this endpoint
        ├── NotFoundError           404  unknown endpoint
        ├── MethodNotAllowedError   405  known endpoint, wrong method
        ├── PayloadTooLargeError    413  body over the configured limit
        ├── RateLimitError          429  the key's request rate limit (upstream 429s are relayed as they are)
        │   └── BudgetExceededError 429  the key's daily or monthly spend budget is used up
        ├── ClientDisconnectedError 499  the client left before the answer (nginx's code)
        └── UpstreamError           502  upstream unreachable or broken
            └── UpstreamTimeoutError 504 upstream did not answer in time

Every ``APIError`` carries its HTTP status as a class attribute; the one place
that turns it into a response is ``gateway.errors.api_error_response``.
"""

from __future__ import annotations

import math


class ArbitrageError(Exception):
    """Base of every error arbitrage raises on purpose."""


class ConfigError(ArbitrageError):
    """The configuration (file, flags or environment) is invalid."""


class StoreError(ArbitrageError):
    """The capture store cannot be read or written."""


class MigrationError(StoreError):
    """A schema migration failed, or the store was written by a newer version."""


class TrainingError(ArbitrageError):
    """A training run stopped without producing an adapter: its loss diverged."""


class APIError(ArbitrageError):
    """An error answered to an API client in OpenAI's error shape."""

    status_code = 500
    error_type = "server_error"

    request_id: str | None = None
    """The gateway's id of the request that failed, when it was recorded (sent as a header)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict:
        """OpenAI's error object: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_denied"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowedError(APIError):
    status_code = 405
    error_type = "invalid_request_error"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        """``Retry-After`` in whole seconds (rounded up), when known."""
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class BudgetExceededError(RateLimitError):
    error_type = "insufficient_quota"  # what OpenAI answers when an account's quota is used up


class ClientDisconnectedError(APIError):
    status_code = 499
    error_type = "client_disconnected"


class UpstreamError(APIError):
    status_code = 502
    error_type = "upstream_error"
    attempts = 0
    """Upstream attempts made before giving up (set where it is known)."""


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    error_type = "upstream_timeout"
