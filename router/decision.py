"""Per-request routing decision: upstream or local, and whether to shadow or audit it.

Pure: the caller states the facts (``RequestFacts``), ``decide`` answers. The decision is only a
first step for a local route: the gateway still serves the local answer only if its confidence
clears the threshold and the output check passes, and falls back upstream otherwise.

Reasons (bounded, usable as metric labels): ``mode_off``, ``unsupported_request:<what>``,
``local_unavailable``, ``mode_shadow``, ``sampled`` / ``not_sampled`` (random draw against the
share), ``sticky`` / ``sticky_not_sampled`` (the end user's stable place in the share).
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

import msgspec

from router.policy import RoutePolicy

LOCAL_ENDPOINTS = frozenset({"chat"})
"""Endpoints the local model answers; everything else (completions, embeddings...) goes upstream."""

_RNG = random.Random()


class RequestFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What routing needs to know about one request."""

    path: str = ""
    """The call path (the sticky hash is per path, so users land differently on each path)."""
    endpoint: str = "chat"
    """chat | completions | embeddings | ..."""
    stream: bool = False
    n: int = 1
    has_tools: bool = False
    """Tools or functions offered (or a tool_choice / tool messages present)."""
    has_images: bool = False
    """Image (or other non-text) content parts in the messages."""
    user: str | None = None
    """End-user id (OpenAI's ``user`` field), for sticky routing."""
    local_ok: bool = True
    """The local model is healthy and the policy's adapter is loaded."""


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """Where one request goes."""

    route: Literal["upstream", "local"]
    reason: str
    shadow: bool = False
    """Upstream serves; also call the local model in the background and compare."""
    audit: bool = False
    """If the local answer is served, also call upstream in the background and compare."""


def decide(policy: RoutePolicy, *, request: RequestFacts, rng: random.Random | None = None) -> Decision:
    """Route one request under ``policy``. Share 0 never and share 100 always routes locally."""
    rng = rng or _RNG
    if policy.mode == "off":
        return Decision(route="upstream", reason="mode_off")
    unsupported = unsupported_feature(request)
    if unsupported:
        return Decision(route="upstream", reason=f"unsupported_request:{unsupported}")
    if not request.local_ok:
        return Decision(route="upstream", reason="local_unavailable")
    if policy.mode == "shadow":
        return Decision(route="upstream", reason="mode_shadow", shadow=_draw(rng, policy.shadow_rate))
    local, reason = _in_share(policy, request, rng)
    if local:
        return Decision(route="local", reason=reason, audit=_draw(rng, policy.audit_rate))
    return Decision(route="upstream", reason=reason, shadow=_draw(rng, policy.shadow_rate))


def unsupported_feature(request: RequestFacts) -> str | None:
    """What keeps the local model from answering this request (None if nothing)."""
    if request.endpoint not in LOCAL_ENDPOINTS:
        return f"endpoint_{request.endpoint}"
    if request.has_tools:
        return "tools"
    if request.has_images:
        return "images"
    if request.n != 1:
        return "n"
    return None


def _in_share(policy: RoutePolicy, request: RequestFacts, rng: random.Random) -> tuple[bool, str]:
    if policy.sticky and request.user is not None:
        inside = sticky_bucket(request.path, request.user) < policy.share / 100.0
        return inside, "sticky" if inside else "sticky_not_sampled"
    inside = rng.random() < policy.share / 100.0  # random() < 1: share 100 is always, 0 never
    return inside, "sampled" if inside else "not_sampled"


def _draw(rng: random.Random, rate: float) -> bool:
    return rng.random() < rate


def sticky_bucket(path: str, user: str) -> float:
    """The user's stable place in [0, 1) on this path: local when it is below share / 100."""
    digest = hashlib.blake2b(f"{path}\x00{user}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53  # 53 bits: exact in a float, never 1.0
