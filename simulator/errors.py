"""Errors the simulator answers with, always in OpenAI's error shape.

    SimulatorError          an error sent to the client as {"error": {...}}
     ├── InvalidRequest     400 invalid_request_error: malformed JSON, missing or bad parameters
     └── SimulatedFailure   a failure asked for by the model name (error-NNN, flaky-N, recover-N,
          │                 hang); the status and body mimic what OpenAI sends for that status
          └── RateLimited   429 with Retry-After and OpenAI's rate-limit body

The status is a class attribute (an instance may override it); ``error_response`` is the one
place where any of these becomes an HTTP response.
"""

from __future__ import annotations

from typing import Any

import orjson
from litestar import Request, Response
from litestar.exceptions import HTTPException

SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"

# What OpenAI sends for a status: (type, code, message).
_OPENAI_ERRORS: dict[int, tuple[str, Any, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory",
          "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found",
          "The model does not exist or you do not have access to it."),
    408: ("invalid_request_error", None, "Request timed out."),
    500: ("server_error", None, SERVER_ERROR_MESSAGE),
    502: ("cf_bad_gateway", 502, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
    504: ("server_error", None, "Gateway timeout."),
}


class SimulatorError(Exception):
    """An error answered in OpenAI's shape."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI would send."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(SimulatorError):
    """The request itself is unusable (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class SimulatedFailure(SimulatorError):
    """A failure chosen by the requested model name, shaped like OpenAI's for that status."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        default_type = "invalid_request_error" if status_code < 500 else "server_error"
        error_type, code, message = _OPENAI_ERRORS.get(
            status_code, (default_type, None, f"Simulated HTTP {status_code} error."))
        super().__init__(message, code=code, headers=headers)
        self.status_code = status_code
        self.error_type = error_type


class RateLimited(SimulatedFailure):
    """OpenAI's request-rate limit: 429, ``Retry-After: 1``, type ``requests``."""

    status_code = 429
    error_type = "requests"

    def __init__(self, model: str) -> None:
        SimulatorError.__init__(
            self,
            f"Rate limit reached for {model} in organization org-simulator on requests per min "
            "(RPM): Limit 500, Used 500, Requested 1. Please try again in 1s. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            code="rate_limit_exceeded",
            headers={"retry-after": "1", "x-ratelimit-limit-requests": "500",
                     "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"},
        )


def error_response(error: SimulatorError) -> Response[bytes]:
    """The HTTP response for a simulator error."""
    return Response(content=orjson.dumps(error.body()), status_code=error.status_code,
                    media_type="application/json", headers=error.headers)


def handle_simulator_error(_: Request, error: SimulatorError) -> Response[bytes]:
    """Litestar exception handler for the simulator's own errors."""
    return error_response(error)


def handle_http_exception(request: Request, error: HTTPException) -> Response[bytes]:
    """Litestar's routing errors (unknown URL, wrong method) in OpenAI's shape."""
    message = f"Invalid URL ({request.method} {request.url.path})"
    if error.status_code != 404:
        message = error.detail
    invalid = InvalidRequest(message, headers=dict(error.headers or {}))
    invalid.status_code = error.status_code
    return error_response(invalid)
