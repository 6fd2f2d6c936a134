"""The local route of a chat call path: decide, try the adapter, gate on confidence and the
output check, fall back upstream inside the same client request; shadow and audit comparisons
in the background; the ramp controller's decisions applied to the route table.

The decision itself is pure (``router.decide``); this module does the I/O around it::

    policy (route table) -> decide -> local: vLLM with log-probs -> confidence >= threshold
                                            and output check ok? -> served locally (record:
                                            served_by local, confidence, counterfactual cost)
                                         else -> upstream (record: served_by fallback, reason)
                                   upstream: forwarded as usual; sampled -> shadow call to the
                                             local model, compared, recorded in ``shadow``

Counterfactual cost of a locally served request: the mean upstream cost of this path's last
upstream-served calls in this process (same requested model), else the upstream price of the
local answer's own token counts. It is an estimate; audit comparisons record the exact upstream
cost of a sample.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from litestar import Response
from litestar.response import Stream

from arbitrage.capture.store import CaptureStore
from arbitrage.errors import StoreError
from arbitrage.pricing import PriceBook
from gateway.local import BackgroundWork, LocalBackend, LocalError
from gateway.metrics import Metrics
from gateway.proxy import REQUEST_ID_HEADER, Call, Outcome, Proxy
from gateway.ramp_evidence import Counts, RampEvidence
from gateway.upstream import TRANSPORT_ERRORS, Upstream
from router.comparators import Comparison, make_comparator
from router.confidence import choice_logprobs, score
from router.decision import Decision, RequestFacts, decide
from router.policy import RoutePolicy
from router.ramp import next_share
from router.stats import wilson

log = logging.getLogger(__name__)

SERVED_BY_HEADER = "x-arbitrage-served-by"
LOCAL_UPSTREAM_NAME = "local"
_COST_MEMORY = 50
CONFIDENT = "confident"
"""The reason of a local answer the route serves (and whose comparisons the ramp counts)."""
"""Upstream-served calls per (path, model) whose mean cost stands in for a local answer's counterfactual."""


@dataclass
class LocalAnswer:
    """What the local model said, and whether it may be served."""

    response: dict
    text: str
    confidence: float
    latency_ms: float
    served: bool
    reason: str


class Router:
    """The local route, shadow and audit work, and the ramp for every chat path with a policy."""

    def __init__(self, table, backend: LocalBackend, proxy: Proxy, store: CaptureStore, prices: PriceBook,
                 metrics: Metrics, background: BackgroundWork, evidence: RampEvidence) -> None:
        self.table = table
        self.backend = backend
        self.proxy = proxy
        self.store = store
        self.prices = prices
        self.metrics = metrics
        self.background = background
        self.evidence = evidence
        self._costs: dict[tuple[str, str], deque[float]] = {}
        self._prompts: dict[str, dict | None] = {}
        self._checks: dict[str, tuple[RoutePolicy, Any]] = {}
        self._comparators: dict[str, tuple[RoutePolicy, Any]] = {}
        self.ask_upstream = None
        """Set by the gateway: ``async (model, body: dict) -> (response dict, cost)`` for audits and the judge."""

    # --- the request path

    def policy_for(self, path: str) -> RoutePolicy | None:
        policy = self.table.get(path)
        return policy if policy is not None and policy.mode != "off" else None

    def decide(self, policy: RoutePolicy, call: Call, parsed, body: dict) -> Decision:
        served_name = self.served_name(call.path, policy)
        facts = RequestFacts(path=call.path, endpoint="chat", stream=call.stream, n=parsed.n or 1,
                             has_tools=bool(body.get("tools") or body.get("functions") or body.get("tool_choice")
                                            or any(m.role == "tool" for m in parsed.messages)),
                             has_images=any(isinstance(m.content, list) and any(
                                 isinstance(p, dict) and p.get("type") != "text" for p in m.content)
                                 for m in parsed.messages),
                             user=body.get("user") if isinstance(body.get("user"), str) else None,
                             local_ok=self.backend.ready(served_name))
        return decide(policy, request=facts)

    @staticmethod
    def served_name(path: str, policy: RoutePolicy) -> str:
        """The name vLLM serves the policy's adapter under."""
        return f"{path}/{policy.adapter}"

    async def try_local(self, call: Call, policy: RoutePolicy, body: dict) -> LocalAnswer | None:
        """Ask the adapter; None (with ``call`` marked as a fallback) when it cannot be served."""
        call.adapter = self.served_name(call.path, policy)
        try:
            answer = await self.ask_local(call.path, policy, body)
        except LocalError as exc:
            self._fallback(call, exc.reason)
            log.info("local route of %s fell back: %s", call.path, exc)
            return None
        call.confidence, call.local_latency_ms = answer.confidence, answer.latency_ms
        self.metrics.confidence.labels(self.metrics.path_label(call.path)).observe(answer.confidence)
        if not answer.served:
            self._fallback(call, answer.reason)
            return None
        call.served_by, call.route_reason = "local", answer.reason
        return answer

    def _fallback(self, call: Call, reason: str) -> None:
        call.served_by, call.route_reason = "fallback", reason
        self.metrics.fallbacks.labels(self.metrics.path_label(call.path), reason).inc()

    async def ask_local(self, path: str, policy: RoutePolicy, body: dict) -> LocalAnswer:
        """The adapter's answer to ``body`` with its confidence and verdict (LocalError if none)."""
        started = time.perf_counter()
        response = await self.backend.complete(self.local_body(path, policy, body), policy.local_timeout_s)
        latency = (time.perf_counter() - started) * 1000
        choice = response["choices"][0]
        text = choice["message"].get("content") or ""
        confidence = score(choice_logprobs(response), policy.confidence)
        if choice.get("finish_reason") == "length":
            return LocalAnswer(response, text, confidence, latency, False, "local_truncated")
        verdict = self._check(path, policy).check(text)
        if not verdict.ok:
            return LocalAnswer(response, text, confidence, latency, False, "invalid_output")
        if confidence < policy.threshold:
            return LocalAnswer(response, text, confidence, latency, False, "low_confidence")
        return LocalAnswer(response, text, confidence, latency, True, CONFIDENT)

    def local_body(self, path: str, policy: RoutePolicy, body: dict) -> dict:
        """The client's request as the adapter was trained to see it: its name, log-probs on, no
        streaming, and the short system prompt if training replaced the path's own."""
        local = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "metadata", "store",
                                                               "logprobs", "top_logprobs", "service_tier", "user")}
        local["model"] = self.served_name(path, policy)
        local["logprobs"] = True
        handling = self._prompt_handling(path, policy)
        if handling and handling.get("mode") == "replace":
            rest = [m for m in body.get("messages", []) if m.get("role") not in ("system", "developer")]
            text = handling.get("text")
            local["messages"] = ([{"role": "system", "content": text}] if text else []) + rest
        return local

    def _prompt_handling(self, path: str, policy: RoutePolicy) -> dict | None:
        name = self.served_name(path, policy)
        if name not in self._prompts:
            try:
                manifest = orjson.loads((self.table.adapter_folder(path, policy.adapter) / "manifest.json").read_bytes())
                self._prompts[name] = manifest.get("system_prompt")
            except (OSError, ValueError):
                self._prompts[name] = None
        return self._prompts[name]

    def _check(self, path: str, policy: RoutePolicy):
        """The policy's output check."""
        return _per_policy(self._checks, path, policy, policy.output_check)

    def _comparator(self, path: str, policy: RoutePolicy):
        """The policy's comparator."""
        return _per_policy(self._comparators, path, policy,
                           lambda: make_comparator(policy.comparator, ask=self._judge(policy)))

    def _judge(self, policy: RoutePolicy):
        if policy.comparator.name != "judge":
            return None

        async def ask(prompt: str) -> str:
            body = {"model": policy.comparator.judge_model, "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0, "max_tokens": 5}
            response, _ = await self.ask_upstream(policy.comparator.judge_model, body)
            return response["choices"][0]["message"].get("content") or ""

        return ask

    # --- answering the client from the local answer

    def respond(self, call: Call, answer: LocalAnswer, wants_logprobs: bool) -> Response:
        """The local answer in the shape the client asked for (JSON or SSE), recorded first."""
        response = dict(answer.response)
        response["model"] = call.model
        if not wants_logprobs:
            response["choices"] = [{k: v for k, v in c.items() if k != "logprobs"} for c in response["choices"]]
        counterfactual = self.counterfactual(call, response.get("usage"))
        outcome = Outcome(200, orjson.dumps(response).decode(), response.get("usage"), call.adapter, None, 0)
        cost = 0.0  # local compute is priced by `arbitrage roi` from [economics], not per call
        self.proxy.write(call, LOCAL_UPSTREAM_NAME, outcome, cost, counterfactual)
        if counterfactual is not None:
            self.metrics.saved.labels(self.metrics.path_label(call.path)).inc(counterfactual - cost)
        headers = {REQUEST_ID_HEADER: call.request_id, SERVED_BY_HEADER: "local"}
        if not call.stream:
            return Response(orjson.dumps(response), status_code=200, headers=headers, media_type="application/json")
        return Stream(_as_events(response, call.wants_usage), media_type="text/event-stream", headers=headers)

    def counterfactual(self, call: Call, usage: dict | None) -> float | None:
        recent = self._costs.get((call.path, call.model))
        if recent:
            return sum(recent) / len(recent)
        usage = usage or {}
        return self.prices.price(call.model, usage.get("prompt_tokens") or 0, 0, usage.get("completion_tokens") or 0)

    def note_upstream_cost(self, record: dict) -> None:
        """Remember what upstream charged for this path (successful, priced calls only)."""
        if record["status_code"] == 200 and record["cost_usd"] is not None and record["served_by"] != "local":
            key = (record["path"], record["model"])
            self._costs.setdefault(key, deque(maxlen=_COST_MEMORY)).append(record["cost_usd"])

    # --- shadow and audit

    def shadow(self, policy: RoutePolicy, path: str, request_id: str, body: dict, upstream_text: str) -> None:
        """Also ask the adapter, in the background, and compare with what upstream answered."""
        async def work() -> None:
            started = time.perf_counter()
            try:
                answer = await self.ask_local(path, policy, body)
            except LocalError as exc:
                self._write_shadow(path, policy, request_id, "shadow", upstream_text, None, None, None, 0.0,
                                   (time.perf_counter() - started) * 1000, f"{exc.reason}: {exc}",
                                   local_reason=exc.reason)
                return
            await self._compare(path, policy, request_id, "shadow", upstream_text, answer.text, answer.confidence,
                                0.0, answer.latency_ms, reason=answer.reason)

        self.background.submit(self.metrics.path_label(path), work)

    def audit(self, policy: RoutePolicy, call: Call, body: dict, local_text: str, confidence: float) -> None:
        """Also ask upstream, in the background, and compare with the local answer served."""
        upstream_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "metadata")}

        async def work() -> None:
            started = time.perf_counter()
            try:
                response, cost = await self.ask_upstream(call.model, upstream_body)
                text = response["choices"][0]["message"].get("content") or ""
            except Exception as exc:  # noqa: BLE001 - an audit that fails is recorded, never raised
                self._write_shadow(call.path, policy, call.request_id, "audit", None, local_text, confidence, None,
                                   None, (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"[:300],
                                   local_reason=CONFIDENT)
                return
            await self._compare(call.path, policy, call.request_id, "audit", text, local_text, confidence, cost,
                                (time.perf_counter() - started) * 1000, reason=CONFIDENT)

        self.background.submit(self.metrics.path_label(call.path), work)

    async def _compare(self, path: str, policy: RoutePolicy, request_id: str, kind: str, upstream_text: str,
                       local_text: str, confidence: float, cost: float | None, latency_ms: float, *,
                       reason: str) -> None:
        comparison: Comparison = await self._comparator(path, policy).acompare(upstream_text, local_text)
        agreed = comparison.agreed if comparison.comparable else None
        shadow_id = self._write_shadow(path, policy, request_id, kind, upstream_text, local_text, confidence, agreed,
                                       cost, latency_ms, None if comparison.comparable else comparison.detail,
                                       local_reason=reason)
        label = self.metrics.path_label(path)
        if cost:
            self.metrics.shadow_cost.labels(label, kind).inc(cost)
        if not comparison.comparable:
            return
        self.metrics.comparisons.labels(label, kind, "true" if comparison.agreed else "false").inc()
        if reason == CONFIDENT:  # evidence for the ramp: answers the route serves (above the threshold, valid)
            self._ramp_evidence(path, policy, shadow_id, comparison.agreed)

    def _write_shadow(self, path, policy, request_id, kind, upstream_text, local_text, confidence, agreed, cost,
                      latency_ms, error, *, local_reason: str) -> str:
        """Record one comparison (or its failure) in the ``shadow`` table; its id. ``local_reason``: what the
        route made of the local answer (``CONFIDENT``: it serves it, and the ramp counts it)."""
        row = {"shadow_id": os.urandom(8).hex(), "ts": datetime.now(UTC), "request_id": request_id, "path": path,
               "adapter": self.served_name(path, policy), "kind": kind, "comparator": policy.comparator.name,
               "upstream_answer": upstream_text, "local_answer": local_text, "confidence": confidence,
               "agreed": agreed, "cost_usd": cost, "latency_ms": latency_ms, "error": error,
               "local_reason": local_reason}
        try:
            self.store.append("shadow", row)
        except StoreError as exc:
            log.error("shadow record of %s failed: %s", request_id, exc)
        return row["shadow_id"]

    # --- the ramp

    def _ramp_evidence(self, path: str, policy: RoutePolicy, shadow_id: str, agreed: bool) -> None:
        current = self.table.get(path)
        if current != policy:
            return  # the policy changed while this comparison ran: it is no evidence for the new one
        revision = self.table.revision(path)
        try:
            counts = self.evidence.add(path, revision, shadow_id, agreed, current.ramp.window)
        except StoreError as exc:
            log.error("ramp evidence of %s not counted: %s", path, exc)
            return
        self._ramp_step(path, current, revision, counts)

    def review_evidence(self, path: str, shadow_id: str, verdict: str) -> bool:
        """Count a person's verdict on a comparison in the ramp's evidence, and let the ramp decide
        on it at once; True when the comparison is in the window of the policy in force."""
        try:
            found = self.evidence.overrule(path, shadow_id, upstream_wrong=verdict == "upstream_wrong")
        except StoreError as exc:
            log.error("the review of %s is not in the ramp's evidence: %s", shadow_id, exc)
            return False
        current, revision = self.table.get(path), self.table.revision(path)
        if found is None or found[0] != revision or current is None:
            return False
        self._ramp_step(path, current, revision, found[1])
        return True

    def _ramp_step(self, path: str, current: RoutePolicy, revision: str, counts: Counts) -> None:
        """The ramp's decision on ``counts``, written to the route table unless the policy changed meanwhile."""
        self._agreement_metrics(path, current, counts)
        decision = next_share(current, counts)
        if decision.action == "hold":
            return
        after = self.table.set(path, decision.apply(current), actor="ramp", action=decision.action,
                               reason=decision.reason, evidence=decision.evidence, revision=revision)
        if after is None:
            return  # another worker's ramp or an operator changed the policy first
        self.metrics.ramp_decisions.labels(self.metrics.path_label(path), decision.action).inc()
        log.warning("ramp %s: %s share %.0f%% -> %.0f%% (%s)", path, decision.action, decision.share_before,
                    decision.share_after, decision.reason)
        self.publish_policy(path, after)

    def forget_evidence(self, path: str, revision: str) -> None:
        """Drop the ramp evidence ``path`` gathered under its policies before ``revision``."""
        try:
            self.evidence.forget(path, revision)
        except StoreError as exc:
            log.error("old ramp evidence of %s not dropped: %s", path, exc)

    def _agreement_metrics(self, path: str, policy: RoutePolicy, counts: Counts) -> None:
        """The ramp's evidence as gauges; without any (a new policy), agreement and its bound are NaN,
        a gap on the dashboard rather than the previous policy's numbers."""
        label = self.metrics.path_label(path)
        rate, lower = math.nan, math.nan
        if counts.n:
            rate, lower = counts.agreed / counts.n, wilson(counts.agreed, counts.n, policy.ramp.z)[0]
        self.metrics.ramp_samples.labels(label).set(counts.n)
        self.metrics.agreement.labels(label).set(rate)
        self.metrics.agreement_lower.labels(label).set(lower)

    def publish_policy(self, path: str, policy: RoutePolicy) -> None:
        """The policy's gauges: share, mode, target and floor, and its ramp evidence so far."""
        label = self.metrics.path_label(path)
        try:
            self._agreement_metrics(path, policy, self.evidence.counts(path, self.table.revision(path)))
        except StoreError as exc:
            log.error("the ramp evidence of %s was not read: %s", path, exc)
        self.metrics.share.labels(label).set(policy.share)
        for mode in ("off", "shadow", "canary", "local"):
            self.metrics.mode.labels(label, mode).set(1 if mode == policy.mode else 0)
        self.metrics.agreement_target.labels(label).set(policy.ramp.target)
        self.metrics.agreement_floor.labels(label).set(policy.ramp.floor)
        for action in ("raise", "rollback"):  # present at 0, so the first decision shows in increase()
            self.metrics.ramp_decisions.labels(label, action)
        for reason in ("queue_full", "error"):  # likewise the first comparison dropped
            self.metrics.shadow_dropped.labels(label, reason)

    def status(self, path: str) -> dict:
        """Live facts about a path's route for the admin API."""
        policy = self.table.get(path)
        facts = {"local_healthy": self.backend.healthy,
                 "adapter_loaded": bool(policy and policy.adapter and self.backend.ready(self.served_name(path, policy)))}
        if policy is None:
            return facts
        try:
            n, agreed = self.evidence.counts(path, self.table.revision(path))
        except StoreError as exc:
            facts["evidence_error"] = str(exc)
            return facts
        if n:  # and what the ramp makes of it now ("too_few_samples", "within_bounds", "at_top", ...)
            low, high = wilson(agreed, n, policy.ramp.z)
            facts["evidence"] = {"n": n, "agreed": agreed, "rate": agreed / n, "lower": low, "upper": high,
                                 "ramp": next_share(policy, Counts(n, agreed)).reason}
        return facts


def answer_text(record_response: str | None) -> str | None:
    """The assistant text of a recorded chat completion."""
    try:
        return orjson.loads(record_response)["choices"][0]["message"].get("content")
    except (TypeError, ValueError, KeyError, IndexError):
        return None


async def _as_events(response: dict, wants_usage: bool):
    """A whole chat completion as the SSE chunks a streaming client expects."""
    head = {"id": response.get("id"), "object": "chat.completion.chunk", "created": response.get("created"),
            "model": response.get("model")}
    for choice in response["choices"]:
        message = choice.get("message") or {}
        yield _event({**head, "choices": [{"index": choice.get("index", 0), "delta": {
            "role": "assistant", "content": message.get("content") or ""}, "finish_reason": None}]})
        yield _event({**head, "choices": [{"index": choice.get("index", 0), "delta": {},
                                           "finish_reason": choice.get("finish_reason")}]})
    if wants_usage and response.get("usage"):
        yield _event({**head, "choices": [], "usage": response["usage"]})
    yield b"data: [DONE]\n\n"


def _event(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def upstream_json(upstream: Upstream, prices: PriceBook, body: dict) -> tuple[dict, float | None]:
    """A non-streaming call to an upstream and its price (audits and the judge)."""
    reply = await upstream.send("POST", "/chat/completions", orjson.dumps(body),
                               upstream.headers({"content-type": "application/json"}))
    try:
        content = await reply.read()
    except TRANSPORT_ERRORS as exc:
        raise LocalError("audit_failed", f"upstream broke off: {exc}") from None
    finally:
        reply.release()
    if reply.status != 200:
        raise LocalError("audit_failed", f"upstream HTTP {reply.status}")
    response = orjson.loads(content)
    usage = response.get("usage") or {}
    cost = prices.price(response.get("model") or body["model"], usage.get("prompt_tokens") or 0,
                        (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                        usage.get("completion_tokens") or 0, upstream.settings.provider, upstream.base_url)
    return response, cost


def _per_policy(cache: dict[str, tuple[RoutePolicy, Any]], path: str, policy: RoutePolicy, build: Callable[[], Any]):
    """``build()``, made once per policy: one entry per path, built again when the path's policy
    object changes (a ramp step or an edit makes a new one)."""
    entry = cache.get(path)
    if entry is None or entry[0] is not policy:
        entry = cache[path] = (policy, build())
    return entry[1]
