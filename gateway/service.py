"""The gateway's components and the request flow shared by every endpoint.

auth -> parse (lenient) -> identify the call path -> pick the upstream -> forward and record.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson
from litestar import Litestar, Request, Response

from arbitrage.capture.store import CaptureStore
from arbitrage.config import Config
from arbitrage.errors import (
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    StoreError,
    UpstreamError,
)
from arbitrage.keys import KeyStore
from arbitrage.pricing import PriceBook
from gateway import shadow_report
from gateway.auth import Authenticator
from gateway.limits import SHARED_LIMITS_ENV, Quotas
from gateway.local import BackgroundWork, LocalBackend
from gateway.metrics import Metrics
from gateway.paths import METADATA_KEY, PATH_HEADER, derived_path, explicit_path
from gateway.proxy import Call, Proxy, StreamAssembler
from gateway.ramp_evidence import ramp_evidence, restore_from_store
from gateway.route_table import RouteTable
from gateway.routing import Router, answer_text, upstream_json
from gateway.upstream import TRANSPORT_ERRORS, Upstream, UpstreamPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """What differs between the OpenAI endpoints the gateway proxies."""

    name: str
    upstream_path: str
    request_type: type
    template: Callable[[Any], str]
    assembler: Callable[[], StreamAssembler] | None


def check_startup(config: Config, keys: KeyStore) -> None:
    """Refuse unsafe setups: no keys off dev mode, dev mode off loopback."""
    loopback = _is_loopback(config.gateway.host)
    if config.gateway.dev and not loopback:
        raise ConfigError(f"--dev accepts any key, so it is only allowed on a loopback address, "
                          f"not {config.gateway.host!r}")
    if not config.gateway.dev and not keys.entries():
        raise ConfigError("no gateway keys exist: create one with 'arbitrage keys create NAME' "
                          "(or run on loopback with --dev, which accepts any key)")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gateway:
    """Everything one gateway process holds, created in the app's lifespan."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(config.metrics.max_paths)
        self.keys = KeyStore(config.data_dir)
        self.auth = Authenticator(self.keys, config.gateway.dev)
        self.store = CaptureStore(config.data_dir, config.capture, config.capture_url)
        self.proxy = Proxy(self.store, PriceBook(config.prices), self.metrics)
        shared = os.environ.get(SHARED_LIMITS_ENV)  # set by serve() for workers > 1
        self.quotas = Quotas(config.data_dir, shared=Path(shared) if shared else None)
        self.proxy.on_spend = self.quotas.spend
        self.pool = UpstreamPool([])
        self._background: asyncio.Task | None = None
        self.routes = RouteTable(config, on_change=self._on_route_change)
        self.local = LocalBackend(config.local, self.metrics)
        self.shadow_work = BackgroundWork(self.metrics, max_pending=config.local.shadow_queue,
                                          concurrency=config.local.shadow_concurrency)
        self.router = Router(self.routes, self.local, self.proxy, self.store, self.proxy.prices, self.metrics,
                             self.shadow_work, ramp_evidence())
        self.router.ask_upstream = self._ask_upstream
        self._route_loop: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Litestar):
        """Open the store and the upstream clients; close both on shutdown."""
        applied = self.store.open()
        if applied:
            log.info("capture store migrated: %s", ", ".join(applied))
        if not self.router.evidence.shared:  # serve() rebuilt the workers' shared evidence already
            await asyncio.to_thread(restore_from_store, self.router.evidence, self.routes, self.config.data_dir)
        self.pool = UpstreamPool([Upstream(u, self.metrics) for u in self.config.upstreams])
        self.pool.open()
        self._background = asyncio.create_task(self.store.run_background(self._on_compaction))
        self.local.open()
        self._route_loop = asyncio.create_task(self._watch_routes())
        gc.collect()
        gc.freeze()  # startup objects leave the collector's view: full collections went from 20-33 ms to ~10
        try:
            yield
        finally:
            self._route_loop.cancel()
            await self.shadow_work.drain()
            self.router.evidence.close()
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            with contextlib.suppress(asyncio.CancelledError):
                await self._route_loop
            await self.local.close()
            await self.pool.aclose()
            await asyncio.to_thread(self.store.close)

    async def _watch_routes(self) -> None:
        """Every second: policies edited by another worker or the admin API, vLLM's health, and
        the adapters the policies need kept loaded."""
        published = None
        while True:
            try:
                self.routes.refresh()
                policies = self.routes.policies()
                if policies != published:
                    for path, policy in policies.items():
                        self.router.publish_policy(path, policy)
                    self._publish_distill_costs(policies)
                    published = policies
                if policies or self.config.local.url:
                    await self.local.reconcile(self.routes.needed_adapters())
            except Exception:
                log.exception("route watch failed")
            await asyncio.sleep(1.0)

    def _publish_distill_costs(self, policies) -> None:
        from distill.roi import one_time_costs

        try:
            costs = one_time_costs(self.config.data_dir, self.config.economics)
        except Exception as exc:  # noqa: BLE001 - a report, not a reason to stop routing
            log.warning("one-time costs unavailable: %s", exc)
            return
        for path in policies:
            if path in costs:
                self.metrics.distill_cost.labels(self.metrics.path_label(path)).set(costs[path])

    def _on_route_change(self, change) -> None:
        self.router.forget_evidence(change.path, change.change_id)
        try:
            self.store.append("route_changes", change.to_record())
        except StoreError as exc:
            log.error("route change of %s not recorded: %s", change.path, exc)

    async def _ask_upstream(self, model: str, body: dict):
        return await upstream_json(self._upstream_for(model), self.proxy.prices, {**body, "model": model})

    def _on_compaction(self, _result, backlog: tuple[int, int]) -> None:
        self.metrics.capture_backlog_segments.set(backlog[0])
        self.metrics.capture_backlog_bytes.set(backlog[1])

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        """Serve one proxied OpenAI call."""
        key = self.auth.identify(request.headers.get("authorization"))
        self.quotas.admit(key)
        key_id = key.id
        body = await request.body()
        parsed = _decode(body, endpoint.request_type)
        named = explicit_path(request.headers.get(PATH_HEADER), parsed.metadata)
        path = named or derived_path(endpoint.name, parsed.model, endpoint.template(parsed))
        upstream = self._upstream_for(parsed.model)
        stream = bool(getattr(parsed, "stream", False)) and endpoint.assembler is not None
        call = Call(endpoint.name, endpoint.upstream_path, key_id, path, parsed.model, body, stream=stream,
                    receive=request.receive)
        headers = upstream.headers(request.headers)
        policy = self.router.policy_for(path) if endpoint.name == "chat.completions" else None
        if policy is not None:
            routed = await self._route(call, parsed, body, policy, stream)
            if routed is not None:
                return routed
        if not stream:
            forwarded = _without_path_metadata(body) if _has_path_metadata(parsed) else body
            return await self.proxy.unary(call, upstream, headers, forwarded)
        options = parsed.stream_options
        call.wants_usage = bool(options and options.include_usage)
        return await self.proxy.stream(call, upstream, headers, _stream_body(body, parsed), endpoint.assembler())

    async def _route(self, call: Call, parsed, body: bytes, policy, stream: bool) -> Response | None:
        """The local route: the local answer as the response, or None to forward upstream (a
        fallback, a request not sampled, or shadow mode, with a shadow comparison scheduled)."""
        data = orjson.loads(body)
        options = parsed.stream_options
        call.wants_usage = not stream or bool(options and options.include_usage)
        decision = self.router.decide(policy, call, parsed, data)
        call.route_reason = decision.reason
        if decision.route == "local":
            answer = await self.router.try_local(call, policy, data)
            if answer is not None:
                if decision.audit:
                    self.router.audit(policy, call, data, answer.text, answer.confidence)
                return self.router.respond(call, answer, wants_logprobs=bool(data.get("logprobs")))

        def after_upstream(record: dict) -> None:
            self.router.note_upstream_cost(record)
            if decision.shadow and record["status_code"] == 200:
                text = answer_text(record["response"])
                if text is not None:
                    self.router.shadow(policy, call.path, call.request_id, data, text)

        call.on_recorded = after_upstream
        return None

    def route_status(self, path: str, disagreements: int = 0) -> dict:
        """Live facts about a path's route (for the admin API), with the threshold calibrated on
        its adapter's shadow and audit comparisons so far, and (``disagreements`` > 0) that many of
        their most confident disagreements."""
        status = self.router.status(path)
        policy = self.routes.get(path)
        if policy is not None and policy.adapter:
            adapter = Router.served_name(path, policy)
            status["calibration"] = shadow_report.calibration(self.config.data_dir, path, adapter, policy)
            if disagreements:
                status["disagreements"] = shadow_report.disagreements(self.config.data_dir, path, adapter,
                                                                      disagreements)
        return status

    def _upstream_for(self, model: str) -> Upstream:
        upstream = self.pool.for_model(model)
        if upstream is None:
            raise NotFoundError(f"The model '{model}' is not served by any configured upstream.",
                                param="model", code="model_not_found")
        return upstream

    async def list_models(self, request: Request) -> Response:
        """``GET /v1/models`` merged over the upstreams (each filtered by its model patterns)."""
        self.auth.authenticate(request.headers.get("authorization"))
        models: dict[str, dict] = {}
        failures = []
        for upstream in self.pool.upstreams:
            try:
                for model in await _fetch_models(upstream, request):
                    if upstream.serves(str(model.get("id"))):
                        models.setdefault(model["id"], model)
            except (*TRANSPORT_ERRORS, UpstreamError, ValueError, KeyError, TypeError) as exc:
                failures.append(f"{upstream.name}: {exc}")
        if failures and not models:
            raise UpstreamError("no upstream listed its models (" + "; ".join(failures) + ")",
                                code="upstream_unreachable")
        return Response({"object": "list", "data": list(models.values())})


    async def retrieve_model(self, request: Request, model: str) -> Response:
        """``GET /v1/models/{model}`` from the upstream that serves it, status and body relayed."""
        self.auth.authenticate(request.headers.get("authorization"))
        upstream = self._upstream_for(model)
        reply = await upstream.send("GET", f"/models/{model}", None, upstream.headers(request.headers))
        try:
            content = await reply.read()
        except TRANSPORT_ERRORS as exc:
            raise UpstreamError(f"upstream {upstream.name!r} broke off its answer", code="upstream_broken") from exc
        return Response(content, status_code=reply.status, media_type=reply.headers.get("content-type"))


async def _fetch_models(upstream: Upstream, request: Request) -> list[dict]:
    reply = await upstream.send("GET", "/models", None, upstream.headers(request.headers))
    content = await reply.read()
    if reply.status != 200:
        raise UpstreamError(f"HTTP {reply.status}")
    return list(orjson.loads(content)["data"])


def _decode(body: bytes, request_type: type):
    if not body:
        raise InvalidRequestError("The request body is empty; send a JSON object.", code="empty_body")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.ValidationError as exc:
        param = str(exc).rpartition("$.")[2].rstrip("`") if "$." in str(exc) else None
        raise InvalidRequestError(f"Invalid request: {exc}", param=param, code="invalid_type") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def _has_path_metadata(parsed) -> bool:
    return isinstance(parsed.metadata, dict) and METADATA_KEY in parsed.metadata


def _without_path_metadata(body: bytes) -> bytes:
    data = orjson.loads(body)
    _drop_path_metadata(data)
    return orjson.dumps(data)


def _drop_path_metadata(data: dict) -> None:
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and METADATA_KEY in metadata:
        metadata.pop(METADATA_KEY)
        if not metadata:
            data.pop("metadata")


def _stream_body(body: bytes, parsed) -> bytes:
    """The body sent upstream for a stream: usage always asked for, the path entry removed."""
    options = parsed.stream_options
    if options and options.include_usage and not _has_path_metadata(parsed):
        return body
    data = orjson.loads(body)
    data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
    _drop_path_metadata(data)
    return orjson.dumps(data)
