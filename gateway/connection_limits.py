"""Limits on how a client may send a request's head: its size and its time.

uvicorn's httptools protocol enforces neither: it has no cap on the request line and
headers (its h11 protocol has ``h11_max_incomplete_event_size``; httptools none) and its
only timer, ``timeout_keep_alive``, runs between requests, so a client that sends its
headers a byte at a time holds a connection for ever (slow loris). This subclass adds
both, in the protocol, where the bytes arrive:

- the request line and headers may total at most ``max_header_bytes``: past that the
  client gets a 431 and the connection is closed;
- they must be complete within ``header_timeout_s`` of the request's first byte: past
  that the client gets a 408 and the connection is closed.

Pass ``http=limited_protocol(settings)`` to ``uvicorn.run``; it is a ``functools.partial``
of a module-level class, so it pickles for worker processes.
"""

from __future__ import annotations

import asyncio
import functools

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from arbitrage.config import GatewaySettings


class HeadTooLarge(Exception):
    """Raised inside the parser's callback to stop parsing an oversized head."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit and a head timeout."""

    def __init__(self, *args, max_header_bytes: int = 16384, header_timeout_s: float = 10.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = max_header_bytes
        self.header_timeout_s = header_timeout_s
        self._head_bytes = 0
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_timer is None:  # a keep-alive connection's next request
            self._start_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:  # the parser stopped on our HeadTooLarge
            self._refuse(431, "Request Header Fields Too Large")
        else:
            super().send_400_response(msg)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large = True
            raise HeadTooLarge()

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request is being served on it
            self._refuse(408, "Request Timeout")

    def _refuse(self, status: int, reason: str) -> None:
        self._stop_head_timer()
        if self.transport.is_closing():
            return
        body = reason.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, reason.encode(), len(body), body))
        self.transport.close()


def limited_protocol(settings: GatewaySettings) -> functools.partial:
    """The ``http=`` argument of ``uvicorn.run`` for these settings."""
    return functools.partial(LimitedHttpToolsProtocol, max_header_bytes=settings.max_header_bytes,
                             header_timeout_s=settings.header_timeout_s)
