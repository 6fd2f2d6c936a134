"""Upstream APIs: which one serves a model, pooled clients, retries.

The client is aiohttp: measured here as a bare proxy it costs about 62 us of CPU per
request against 888 us for httpx (bench/RESULTS.md), which decides the gateway's
throughput per core. Retries (exponential backoff with jitter, ``Retry-After``
honoured) happen on connect errors, 429 and 5xx, and only before anything reached the
client: a reply is handed to the caller only once its status is final.
"""

from __future__ import annotations

import asyncio
import fnmatch
from typing import AsyncIterator

import aiohttp
import stamina
from multidict import CIMultiDictProxy

from arbitrage.config import UpstreamSettings
from arbitrage.errors import UpstreamError, UpstreamTimeoutError
from gateway.metrics import Metrics

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Failures before any response byte arrived: nothing was generated, so a retry is safe.
_RETRYABLE_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.ServerDisconnectedError)
# Anything that can break an upstream exchange (aiohttp's socket timeouts are TimeoutErrors).
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# Hop-by-hop and framing headers are never forwarded in either direction.
_DROP_REQUEST_HEADERS = frozenset({"host", "authorization", "content-length", "connection", "transfer-encoding",
                                   "keep-alive", "accept-encoding", "x-arbitrage-path", "cookie", "api-key"})
RELAYED_RESPONSE_HEADERS = ("x-request-id", "openai-processing-ms", "openai-organization", "openai-version",
                            "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
                            "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
                            "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


class _RetryableStatus(Exception):
    """An upstream answer worth another attempt (429 or 5xx)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response.status)
        self.response = response


class UpstreamReply:
    """A final upstream response whose body is not read yet, and how many attempts it took."""

    def __init__(self, response: aiohttp.ClientResponse, attempts: int) -> None:
        self._response = response
        self.attempts = attempts

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._response.headers

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        try:
            return await self._response.read()
        finally:
            self._response.release()

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        return self._response.content.iter_any()

    def abort(self) -> None:
        """Close the connection: the upstream stops generating (used when the client left)."""
        self._response.close()

    def release(self) -> None:
        self._response.release()


class Upstream:
    """One configured upstream with its pooled keep-alive connections."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.name = settings.name
        self.base_url = settings.base_url.rstrip("/")
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        """Create the connection pool (inside the running event loop)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s,
                                        sock_read=self.settings.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True)

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
        """Send with retries; the reply's body is still to be read or streamed."""
        tries = [1]
        try:
            try:
                return await self._attempt(method, path, body, headers, 1)
            except (_RetryableStatus, *_RETRYABLE_ERRORS) as first:
                return await self._retry(first, method, path, body, headers, tries)
        except asyncio.TimeoutError as exc:
            error = UpstreamTimeoutError(f"upstream {self.name!r} did not answer in time", code="upstream_timeout")
            error.attempts = tries[0]
            raise error from exc
        except aiohttp.ClientError as exc:
            error = UpstreamError(f"upstream {self.name!r} is unreachable ({type(exc).__name__})",
                                  code="upstream_unreachable")
            error.attempts = tries[0]
            raise error from exc

    async def _retry(self, first: Exception, method: str, path: str, body: bytes | None,
                     headers: dict[str, str], tries: list[int]) -> UpstreamReply:
        """The slow path, entered only after a failed first attempt (the retry machinery costs
        about 7% of a request's CPU, so the common case stays out of it)."""
        async for attempt in stamina.retry_context(
            on=self._backoff, attempts=self.settings.max_retries + 1, timeout=None,
            wait_initial=0.2, wait_max=self.settings.retry_max_wait_s, wait_jitter=0.5,
        ):
            with attempt:
                tries[0] = attempt.num
                if attempt.num == 1:
                    raise first  # already happened: stamina decides on it and waits as usual
                return await self._attempt(method, path, body, headers, attempt.num)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
                       number: int) -> UpstreamReply:
        response = await self._session.request(method, self.base_url + path, data=body, headers=headers)
        if response.status in RETRYABLE_STATUS and number <= self.settings.max_retries:
            response.release()
            raise _RetryableStatus(response)
        return UpstreamReply(response, number)

    def _backoff(self, exc: Exception) -> bool | float:
        """Decide whether to retry; a float is a wait taken from Retry-After."""
        if isinstance(exc, _RetryableStatus):
            self._metrics.retries.labels(self.name, str(exc.response.status)).inc()
            wait = _retry_after(exc.response, self.settings.retry_max_wait_s)
            return True if wait is None else wait
        if isinstance(exc, _RETRYABLE_ERRORS):
            self._metrics.retries.labels(self.name, type(exc).__name__).inc()
            return True
        return False

    async def aclose(self) -> None:
        if self._session:
            await self._session.close()


def _retry_after(response: aiohttp.ClientResponse, cap: float) -> float | None:
    try:
        if (value := response.headers.get("retry-after-ms")) is not None:
            return min(float(value) / 1000, cap)
        value = response.headers.get("retry-after")
        return min(float(value), cap) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to exponential backoff


class UpstreamPool:
    """All upstreams; picks the first whose model patterns match."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams

    def open(self) -> None:
        for upstream in self.upstreams:
            upstream.open()

    def for_model(self, model: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.serves(model)), None)

    async def aclose(self) -> None:
        for upstream in self.upstreams:
            await upstream.aclose()
