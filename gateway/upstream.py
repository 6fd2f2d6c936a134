"""Upstream APIs: which one serves a model, pooled clients, retries.

Retries (with exponential backoff and jitter, ``Retry-After`` honoured) happen
on connect errors, 429 and 5xx, and only before anything reached the client:
a response is handed to the caller only once its status is final.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import httpx
import stamina

from arbitrage.config import UpstreamSettings
from arbitrage.errors import UpstreamError, UpstreamTimeoutError
from gateway.metrics import Metrics

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRYABLE_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
# Hop-by-hop and framing headers are never forwarded in either direction.
_DROP_REQUEST_HEADERS = frozenset({"host", "authorization", "content-length", "connection", "transfer-encoding",
                                   "keep-alive", "accept-encoding", "x-arbitrage-path", "cookie", "api-key"})
RELAYED_RESPONSE_HEADERS = ("x-request-id", "openai-processing-ms", "openai-organization", "openai-version",
                            "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
                            "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
                            "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


class _RetryableStatus(Exception):
    """An upstream answer worth another attempt (429 or 5xx)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


@dataclass
class UpstreamReply:
    """A final upstream response (body not yet read) and how many attempts it took."""

    response: httpx.Response
    attempts: int


class Upstream:
    """One configured upstream with its pooled keep-alive client."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self.name = settings.name
        self.base_url = settings.base_url.rstrip("/")
        self._metrics = metrics
        limits = httpx.Limits(max_connections=settings.max_connections,
                              max_keepalive_connections=settings.max_connections)
        timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        self.client = httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport)

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.settings.models)

    def headers(self, client_headers) -> dict[str, str]:
        """Client headers minus hop-by-hop ones and the gateway key, plus the upstream key."""
        out = {k: v for k, v in client_headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
        key = self.settings.api_key()
        if key:
            out["authorization"] = f"Bearer {key}"
        return out

    async def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> UpstreamReply:
        """Send with retries; the returned response is streamed (call ``aread`` or iterate)."""
        request = self.client.build_request(method, self.base_url + path, content=body, headers=headers)
        attempts = 0
        try:
            async for attempt in stamina.retry_context(
                on=self._backoff, attempts=self.settings.max_retries + 1, timeout=None,
                wait_initial=0.2, wait_max=self.settings.retry_max_wait_s, wait_jitter=0.5,
            ):
                with attempt:
                    attempts = attempt.num
                    response = await self.client.send(request, stream=True)
                    if response.status_code in RETRYABLE_STATUS and attempts <= self.settings.max_retries:
                        await response.aclose()
                        raise _RetryableStatus(response)
                    return UpstreamReply(response, attempts)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"upstream {self.name!r} did not answer in time ({type(exc).__name__})",
                                       code="upstream_timeout") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(f"upstream {self.name!r} is unreachable ({type(exc).__name__})",
                                code="upstream_unreachable") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, exc: Exception) -> bool | float:
        """Decide whether to retry; a float is a wait taken from Retry-After."""
        if isinstance(exc, _RetryableStatus):
            self._metrics.retries.labels(self.name, str(exc.response.status_code)).inc()
            wait = _retry_after(exc.response, self.settings.retry_max_wait_s)
            return True if wait is None else wait
        if isinstance(exc, _RETRYABLE_ERRORS):
            self._metrics.retries.labels(self.name, type(exc).__name__).inc()
            return True
        return False

    async def aclose(self) -> None:
        await self.client.aclose()


def _retry_after(response: httpx.Response, cap: float) -> float | None:
    value = response.headers.get("retry-after-ms")
    try:
        if value is not None:
            return min(float(value) / 1000, cap)
        value = response.headers.get("retry-after")
        return min(float(value), cap) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to exponential backoff


class UpstreamPool:
    """All upstreams; picks the first whose model patterns match."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams

    def for_model(self, model: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.serves(model)), None)

    async def aclose(self) -> None:
        for upstream in self.upstreams:
            await upstream.aclose()
