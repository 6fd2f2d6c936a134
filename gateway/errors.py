"""The one place where errors become OpenAI-shaped JSON responses."""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException

from arbitrage.errors import (APIError, InvalidRequestError, MethodNotAllowedError, NotFoundError, PayloadTooLargeError,
                              RateLimitError)

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-arbitrage-request-id"


def api_error_response(exc: APIError, headers: dict[str, str] | None = None) -> Response:
    """An ``APIError`` as OpenAI's error body with the error's status."""
    return Response(exc.to_body(), status_code=exc.status_code, headers=headers)


def _from_http_exception(exc: HTTPException) -> APIError:
    if exc.status_code == 404:
        return NotFoundError("Unknown endpoint.", code="unknown_url")
    if exc.status_code == 405:
        return MethodNotAllowedError("Method not allowed on this endpoint.", code="method_not_allowed")
    if exc.status_code == 413:
        return PayloadTooLargeError("Request body is larger than the gateway's limit.", code="body_too_large")
    error = InvalidRequestError(str(exc.detail))
    error.status_code = exc.status_code
    return error


def handle_api_error(_: Request, exc: APIError) -> Response:
    headers = exc.headers() if isinstance(exc, RateLimitError) else {}
    if exc.request_id:  # the call was recorded: the client can find its record
        headers = {**headers, REQUEST_ID_HEADER: exc.request_id}
    return api_error_response(exc, headers or None)


def handle_http_exception(_: Request, exc: HTTPException) -> Response:
    return api_error_response(_from_http_exception(exc))


def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    error = APIError("The gateway hit an internal error; the request was not completed.")
    return api_error_response(error)


EXCEPTION_HANDLERS = {
    APIError: handle_api_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
