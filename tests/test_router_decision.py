"""Per-request decision: the share is honoured, 0 and 100 exactly, sticky users keep their side,
requests the local model cannot serve go upstream."""

from __future__ import annotations

import math
import random

import pytest

from router.decision import RequestFacts, decide
from router.policy import RoutePolicy

DRAWS = 10_000
CHAT = RequestFacts(path="banking")


def canary(share: float, **fields) -> RoutePolicy:
    return RoutePolicy(mode="canary", adapter="banking/v1", share=share, **fields)


def local_count(policy: RoutePolicy, facts: RequestFacts = CHAT, seed: int = 7) -> int:
    rng = random.Random(seed)
    return sum(decide(policy, request=facts, rng=rng).route == "local" for _ in range(DRAWS))


def within_binomial_bound(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("share", [1, 30, 75])
def test_share_is_honoured_within_a_binomial_bound(share):
    assert within_binomial_bound(local_count(canary(share)), DRAWS, share / 100)


def test_share_0_and_100_are_exact():
    assert local_count(canary(0)) == 0
    assert local_count(canary(100)) == DRAWS
    assert local_count(RoutePolicy(mode="local", adapter="banking/v1")) == DRAWS


def test_reasons_of_random_sampling():
    rng = random.Random(1)
    reasons = {decide(canary(50), request=CHAT, rng=rng).reason for _ in range(100)}
    assert reasons == {"sampled", "not_sampled"}


def test_mode_off_and_shadow_never_route_locally():
    off = RoutePolicy(mode="off", adapter="banking/v1", share=100)
    assert decide(off, request=CHAT).reason == "mode_off"
    shadow = RoutePolicy(mode="shadow", adapter="banking/v1")
    assert local_count(off) == local_count(shadow) == 0


def test_shadow_rate_samples_upstream_served_requests():
    rng = random.Random(3)
    shadow = RoutePolicy(mode="shadow", adapter="banking/v1", shadow_rate=0.2)
    decisions = [decide(shadow, request=CHAT, rng=rng) for _ in range(DRAWS)]
    assert {d.reason for d in decisions} == {"mode_shadow"}
    assert within_binomial_bound(sum(d.shadow for d in decisions), DRAWS, 0.2)
    assert not any(d.audit for d in decisions)


def test_audit_only_on_local_and_shadow_only_on_upstream():
    rng = random.Random(4)
    decisions = [decide(canary(50, shadow_rate=1.0, audit_rate=1.0), request=CHAT, rng=rng) for _ in range(200)]
    assert all(d.audit and not d.shadow for d in decisions if d.route == "local")
    assert all(d.shadow and not d.audit for d in decisions if d.route == "upstream")


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (RequestFacts(has_tools=True), "unsupported_request:tools"),
        (RequestFacts(has_images=True), "unsupported_request:images"),
        (RequestFacts(n=2), "unsupported_request:n"),
        (RequestFacts(endpoint="completions"), "unsupported_request:endpoint_completions"),
        (RequestFacts(endpoint="embeddings"), "unsupported_request:endpoint_embeddings"),
        (RequestFacts(local_ok=False), "local_unavailable"),
    ],
)
def test_requests_the_local_model_cannot_serve_go_upstream_without_shadow(facts, reason):
    policy = RoutePolicy(mode="local", adapter="banking/v1", shadow_rate=1.0)
    decision = decide(policy, request=facts, rng=random.Random(0))
    assert (decision.route, decision.reason, decision.shadow) == ("upstream", reason, False)


def test_streaming_requests_may_be_served_locally():
    policy = RoutePolicy(mode="local", adapter="banking/v1")
    assert decide(policy, request=RequestFacts(stream=True)).route == "local"


def sticky_side(share: float, user: str, seed: int) -> str:
    facts = RequestFacts(path="banking", user=user)
    return decide(canary(share, sticky=True), request=facts, rng=random.Random(seed)).route


def test_sticky_users_keep_their_side():
    users = [f"user-{i}" for i in range(200)]
    sides = {u: sticky_side(30, u, seed=0) for u in users}
    assert all(sticky_side(30, u, seed=s) == sides[u] for u in users for s in (1, 2, 3))
    assert set(sides.values()) == {"local", "upstream"}


def test_sticky_users_move_only_when_the_share_crosses_them():
    users = [f"user-{i}" for i in range(500)]
    at_10 = {u for u in users if sticky_side(10, u, 0) == "local"}
    at_25 = {u for u in users if sticky_side(25, u, 0) == "local"}
    assert at_10 and at_10 < at_25


def test_sticky_share_is_honoured_across_users_and_exact_at_0_and_100():
    users = [f"user-{i}" for i in range(DRAWS)]
    assert within_binomial_bound(sum(sticky_side(30, u, 0) == "local" for u in users), DRAWS, 0.3)
    assert {sticky_side(0, u, 0) for u in users} == {"upstream"}
    assert {sticky_side(100, u, 0) for u in users} == {"local"}


def test_sticky_reasons_and_anonymous_requests_are_sampled():
    facts = RequestFacts(path="banking", user="alice")
    assert decide(canary(100, sticky=True), request=facts).reason == "sticky"
    assert decide(canary(0, sticky=True), request=facts).reason == "sticky_not_sampled"
    assert decide(canary(100, sticky=True), request=CHAT).reason == "sampled"
