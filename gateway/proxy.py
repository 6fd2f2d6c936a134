"""Forwarding a call upstream and recording it: the hot loop.

Non-streaming: the upstream body is relayed byte for byte after its record is
written. Streaming: events are relayed as they arrive; upstream is always asked
for usage (``stream_options.include_usage``) and that extra chunk is removed
when the client did not ask for it. A stream that ends without ``[DONE]``
reaches the client as an error event, never as a clean end. A client that
disconnects cancels the upstream call, and the record says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import AsyncIterator, Awaitable, Callable, Protocol

import orjson
from litestar import Response
from litestar.response import Stream

from arbitrage.errors import APIError, ClientDisconnectedError, StoreError, UpstreamError, UpstreamTimeoutError
from arbitrage.pricing import PriceBook
from arbitrage.capture.store import CaptureStore
from gateway.errors import REQUEST_ID_HEADER
from gateway.metrics import Metrics
from gateway.sse import DONE, EventSplitter, error_event, event_data
from gateway.upstream import RELAYED_RESPONSE_HEADERS, TRANSPORT_ERRORS, Upstream, UpstreamReply

log = logging.getLogger(__name__)

SERVED_BY_UPSTREAM = "upstream"
ROUTE_NO_LOCAL = "no_local_route"


class StreamAssembler(Protocol):
    """Builds the whole response object from stream chunks (for the record)."""

    usage: dict | None

    def add(self, chunk: dict) -> bool:
        """Take one chunk; True when it carried the first generated content."""

    def result(self) -> dict:
        """The assembled response."""


@dataclass
class Call:
    """One client request on its way through the gateway."""

    endpoint: str
    upstream_path: str
    key_id: str
    path: str
    model: str
    body: bytes
    stream: bool = False
    wants_usage: bool = True
    request_id: str = field(default_factory=lambda: os.urandom(16).hex())
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    receive: Callable[[], Awaitable[dict]] | None = None
    """The client connection's ASGI receive, to notice a client that leaves early."""
    served_by: str = SERVED_BY_UPSTREAM
    """upstream | local | fallback (tried locally, answered upstream)."""
    route_reason: str = ROUTE_NO_LOCAL
    adapter: str | None = None
    confidence: float | None = None
    local_latency_ms: float | None = None
    on_recorded: Callable[[dict], None] | None = None
    """Called with the call's record once it is written (the router's shadow comparisons)."""

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


@dataclass
class Outcome:
    """How a call ended, for its record and metrics."""

    status_code: int
    response: str | None = None
    usage: dict | None = None
    response_model: str | None = None
    error_type: str | None = None
    attempts: int = 0
    ttft_ms: float | None = None


class Proxy:
    """Forwards calls to an upstream and records each one exactly once."""

    def __init__(self, store: CaptureStore, prices: PriceBook, metrics: Metrics) -> None:
        self.store = store
        self.prices = prices
        self.metrics = metrics
        self.on_spend: Callable[[str, float | None], None] = lambda key_id, cost_usd: None

    async def unary(self, call: Call, upstream: Upstream, headers: dict[str, str], body: bytes) -> Response:
        """Forward a non-streaming call; relay the upstream body as it is."""
        reply = await self._send(call, upstream, body, headers)
        try:
            content = await reply.read()
        except TRANSPORT_ERRORS as exc:
            raise self._fail(call, upstream, reply.attempts, exc) from exc
        self.record(call, upstream, _outcome(reply, content, _json_object(content)))
        return Response(content, status_code=reply.status, headers=self._headers(call, reply),
                        media_type=reply.headers.get("content-type", "application/json"))

    async def stream(self, call: Call, upstream: Upstream, headers: dict[str, str], body: bytes,
                     assembler: StreamAssembler) -> Response:
        """Forward a streaming call; relay its events as they arrive."""
        reply = await self._send(call, upstream, body, headers)
        ctype = reply.headers.get("content-type", "")
        if reply.status != 200 or not ctype.startswith("text/event-stream"):
            try:
                content = await reply.read()
            except TRANSPORT_ERRORS as exc:
                raise self._fail(call, upstream, reply.attempts, exc) from exc
            self.record(call, upstream, _outcome(reply, content, _json_object(content)))
            return Response(content, status_code=reply.status, media_type=ctype or None,
                            headers=self._headers(call, reply))
        events = self._relay(call, upstream, reply, assembler)
        return Stream(events, media_type="text/event-stream", headers=self._headers(call, reply))

    async def _send(self, call: Call, upstream: Upstream, body: bytes, headers: dict[str, str]) -> UpstreamReply:
        """Send upstream; if the client leaves before the answer, the upstream call is cancelled
        (an LLM answer can take a minute, and it is billed)."""
        watch = DisconnectWatch(call.receive, asyncio.current_task()) if call.receive else None
        try:
            return await upstream.send("POST", call.upstream_path, body, headers)
        except asyncio.CancelledError:
            if not (watch and watch.client_gone):
                raise
            asyncio.current_task().uncancel()
            self.record(call, upstream, Outcome(499, error_type="client_disconnected"))
            raise ClientDisconnectedError("The client closed the connection before the answer.") from None
        except UpstreamError as exc:
            self.record(call, upstream, Outcome(exc.status_code, error_type=exc.code, attempts=exc.attempts))
            exc.request_id = call.request_id
            raise
        finally:
            if watch:
                watch.stop()

    def _fail(self, call: Call, upstream: Upstream, attempts: int, exc: Exception) -> APIError:
        if isinstance(exc, asyncio.TimeoutError):
            error = UpstreamTimeoutError(f"upstream {upstream.name!r} stopped answering mid-response",
                                         code="upstream_timeout")
        else:
            error = UpstreamError(f"upstream {upstream.name!r} broke off its answer ({type(exc).__name__})",
                                  code="upstream_broken")
        self.record(call, upstream, Outcome(error.status_code, error_type=error.code, attempts=attempts))
        error.request_id = call.request_id
        return error

    async def _relay(self, call: Call, upstream: Upstream, reply: UpstreamReply,
                     assembler: StreamAssembler) -> AsyncIterator[bytes]:
        outcome = Outcome(200, attempts=reply.attempts, error_type="stream_cut_off")
        try:
            async with contextlib.aclosing(_upstream_events(reply)) as events:
                async for event in events:
                    out = self._relay_event(call, upstream, event, assembler, outcome)
                    if out is not None:
                        yield out
                    if outcome.error_type is None:  # [DONE] arrived and the call is recorded
                        return
        except asyncio.TimeoutError:
            outcome.error_type = "upstream_timeout"
        except TRANSPORT_ERRORS:
            outcome.error_type = "stream_cut_off"
        except (asyncio.CancelledError, GeneratorExit):
            reply.abort()  # the client left: stop the upstream generating (and billing)
            outcome.error_type = "client_disconnected"
            self._finish_stream(call, upstream, outcome, assembler, 499)
            raise
        except Exception:  # the client must still get an error event, and the call a record
            log.exception("relaying the stream of request %s failed", call.request_id)
            outcome.error_type = "gateway_error"
        finally:
            reply.release()
        self._finish_stream(call, upstream, outcome, assembler, 502)
        yield error_event("The upstream stream ended before the answer was complete.", "upstream_error",
                          outcome.error_type or "stream_cut_off")

    def _relay_event(self, call: Call, upstream: Upstream, event: bytes, assembler: StreamAssembler,
                     outcome: Outcome) -> bytes | None:
        """The bytes to send the client for one upstream event (None to drop it)."""
        data = event_data(event)
        if data is None:
            return event + b"\n\n"
        if data == DONE:
            outcome.error_type = None
            self._finish_stream(call, upstream, outcome, assembler, 200)
            return event + b"\n\n"
        chunk = _json_object(data)
        if chunk is None:
            return event + b"\n\n"
        if "error" in chunk:
            outcome.error_type = "upstream_stream_error"
            return event + b"\n\n"
        if chunk.get("usage"):  # OpenAI sends it in a chunk of its own; some providers beside the last choice
            assembler.usage = chunk["usage"]
            if not chunk.get("choices") and not call.wants_usage:
                return None
        if assembler.add(chunk) and outcome.ttft_ms is None:
            outcome.ttft_ms = call.elapsed_ms()
        return event + b"\n\n"

    def _finish_stream(self, call: Call, upstream: Upstream, outcome: Outcome,
                       assembler: StreamAssembler, status: int) -> None:
        result = assembler.result()
        outcome.status_code = status
        outcome.usage = assembler.usage
        outcome.response_model = result.get("model")
        outcome.response = orjson.dumps(result).decode()
        self.record(call, upstream, outcome)

    def record(self, call: Call, upstream: Upstream, outcome: Outcome) -> None:
        """Write the call's one record (answered upstream) and count it in the metrics."""
        prompt, cached, completion = token_counts(outcome.usage)
        cost = self._cost(call, upstream, outcome, prompt, cached, completion)
        self.write(call, upstream.name, outcome, cost, cost)

    def write(self, call: Call, upstream_name: str | None, outcome: Outcome, cost: float | None,
              counterfactual: float | None) -> dict:
        """Write one record with the given dollars (the local route's records come here directly)."""
        prompt, cached, completion = token_counts(outcome.usage)
        self.on_spend(call.key_id, cost)
        record = {
            "request_id": call.request_id, "ts": call.ts, "key_id": call.key_id, "path": call.path,
            "endpoint": call.endpoint, "model": call.model, "upstream": upstream_name,
            "response_model": outcome.response_model, "served_by": call.served_by,
            "route_reason": call.route_reason, "status_code": outcome.status_code, "error_type": outcome.error_type,
            "stream": call.stream, "prompt_tokens": prompt, "cached_tokens": cached,
            "completion_tokens": completion, "cost_usd": cost, "counterfactual_cost_usd": counterfactual,
            "priced": cost is not None, "latency_ms": call.elapsed_ms(), "ttft_ms": outcome.ttft_ms,
            "upstream_attempts": outcome.attempts, "request": call.body.decode("utf-8", "replace"),
            "response": outcome.response, "adapter": call.adapter, "confidence": call.confidence,
            "local_latency_ms": call.local_latency_ms,
        }
        self._append(record)
        self._observe(call, record)
        if call.on_recorded is not None:
            call.on_recorded(record)
        return record

    def _cost(self, call: Call, upstream: Upstream, outcome: Outcome, prompt: int, cached: int,
              completion: int) -> float | None:
        if outcome.usage is None:
            # No usage: an error answer costs nothing; a broken-off stream's cost is unknown.
            return 0.0 if outcome.error_type and outcome.error_type != "client_disconnected" else None
        model = outcome.response_model or call.model
        return self.prices.price(model, prompt, cached, completion, upstream.settings.provider, upstream.base_url)

    def _append(self, record: dict) -> None:
        try:
            self.store.append("calls", record)
            self.metrics.capture_records.inc()
        except StoreError as exc:
            self.metrics.capture_failures.inc()
            log.error("capture failed for request %s: %s", record["request_id"], exc)

    def _observe(self, call: Call, record: dict) -> None:
        m, path, served = self.metrics, self.metrics.path_label(call.path), record["served_by"]
        m.requests.labels(path, call.endpoint, served, f"{record['status_code'] // 100}xx").inc()
        m.latency.labels(call.endpoint, served).observe(record["latency_ms"] / 1000)
        if record["ttft_ms"] is not None:
            m.ttft.labels(call.endpoint, served).observe(record["ttft_ms"] / 1000)
        if record["error_type"]:
            m.errors.labels(_error_label(record["error_type"])).inc()
        for kind in ("prompt", "cached", "completion"):
            if record[f"{kind}_tokens"]:
                m.tokens.labels(path, served, kind).inc(record[f"{kind}_tokens"])
        if record["cost_usd"] is None:
            m.unpriced.labels(path).inc()
        else:
            m.cost.labels(path, served).inc(record["cost_usd"])
        if record["counterfactual_cost_usd"] is not None:
            m.counterfactual_cost.labels(path).inc(record["counterfactual_cost_usd"])

    def _headers(self, call: Call, reply: UpstreamReply) -> dict[str, str]:
        headers = {REQUEST_ID_HEADER: call.request_id}
        for name in RELAYED_RESPONSE_HEADERS:
            value = reply.headers.get(name)
            if value is not None:
                headers[name] = value
        return headers


class DisconnectWatch:
    """Cancels a task when its client disconnects. It starts watching only after ``after``
    seconds: quick calls pay nothing for it (a task per call cost about 15 % of the throughput)."""

    def __init__(self, receive: Callable[[], Awaitable[dict]], task: asyncio.Task, after: float = 0.5) -> None:
        self.client_gone = False
        self._watcher: asyncio.Task | None = None
        self._timer = asyncio.get_running_loop().call_later(after, self._start, receive, task)

    def _start(self, receive: Callable[[], Awaitable[dict]], task: asyncio.Task) -> None:
        self._watcher = asyncio.ensure_future(self._watch(receive, task))

    async def _watch(self, receive: Callable[[], Awaitable[dict]], task: asyncio.Task) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        task.cancel()

    def stop(self) -> None:
        self._timer.cancel()
        if self._watcher:
            self._watcher.cancel()


async def _upstream_events(reply: UpstreamReply) -> AsyncIterator[bytes]:
    """Whole SSE events from the upstream body, as they complete."""
    splitter = EventSplitter()
    async for data in reply.chunks():
        for event in splitter.feed(data):
            yield event
    for event in splitter.flush():
        yield event


ERROR_LABELS = frozenset({"stream_cut_off", "upstream_timeout", "client_disconnected", "upstream_stream_error",
                          "upstream_unreachable", "upstream_broken", "upstream_http_error", "rate_limited",
                          "gateway_error"})


def _error_label(error_type: str) -> str:
    return error_type if error_type in ERROR_LABELS else "other"


def token_counts(usage: dict | None) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens of an OpenAI usage object."""
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage.get("prompt_tokens") or 0, cached, usage.get("completion_tokens") or 0


def _outcome(reply: UpstreamReply, content: bytes, parsed: dict | None) -> Outcome:
    status = reply.status
    error_type = None if status < 400 else ("rate_limited" if status == 429 else "upstream_http_error")
    parsed = parsed or {}
    return Outcome(status, content.decode("utf-8", "replace"), parsed.get("usage") if status < 400 else None,
                   parsed.get("model"), error_type, reply.attempts)


def _json_object(content: bytes) -> dict | None:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
