"""Ramp controller: raise a path's local share step by step on evidence, roll it back on bad news.

Pure: given the policy and the agreement evidence gathered under it (``gateway.ramp_evidence``
keeps it per policy revision, for every worker), say what to do. ``raise`` when the Wilson lower
bound of agreement is >= ``ramp.target`` with at least ``ramp.min_samples`` comparisons;
``rollback`` (to shadow mode, share 0) when the upper bound is < ``ramp.floor``, however few the
comparisons (a low upper bound is already strong evidence); otherwise ``hold``. Shadow -> canary
on the first step, canary -> local at 100.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import msgspec

from router.policy import Mode, RoutePolicy
from router.stats import wilson


class Evidence(Protocol):
    """Agreement counts under the policy in force (``gateway.ramp_evidence.Counts`` is one)."""

    @property
    def n(self) -> int: ...

    @property
    def agreed(self) -> int: ...


class RampDecision(msgspec.Struct, frozen=True, kw_only=True):
    """What the controller decided, with the evidence, for the record and the metrics."""

    action: Literal["hold", "raise", "rollback"]
    share_before: float
    share_after: float
    mode_after: Mode
    reason: str
    evidence: dict[str, Any]
    """n, agreed, rate, lower, upper, target, floor, min_samples."""

    def apply(self, policy: RoutePolicy) -> RoutePolicy:
        """``policy`` with this decision's mode and share."""
        if self.action == "hold":
            return policy
        return policy.with_changes(mode=self.mode_after, share=self.share_after)


def next_share(policy: RoutePolicy, evidence: Evidence) -> RampDecision:
    """The ramp decision for ``policy`` on ``evidence``.

    Reasons: ``ramp_disabled``, ``mode_off``, ``below_floor`` (rollback, or hold in shadow mode),
    ``too_few_samples``, ``at_top``, ``above_target`` (raise), ``within_bounds``.
    """
    ramp = policy.ramp
    facts = _evidence(policy, evidence)
    if not ramp.enabled:
        return _decide(policy, facts, "hold", "ramp_disabled")
    if policy.mode == "off":
        return _decide(policy, facts, "hold", "mode_off")
    if facts["upper"] < ramp.floor:
        if policy.mode == "shadow":
            return _decide(policy, facts, "hold", "below_floor")
        return _decide(policy, facts, "rollback", "below_floor", share=0.0, mode="shadow")
    if facts["n"] < ramp.min_samples:
        return _decide(policy, facts, "hold", "too_few_samples")
    if facts["lower"] < ramp.target:
        return _decide(policy, facts, "hold", "within_bounds")
    step = next((s for s in ramp.steps if s > policy.share), None)
    if step is None:
        return _decide(policy, facts, "hold", "at_top")
    return _decide(policy, facts, "raise", "above_target", share=step, mode="local" if step >= 100 else "canary")


def _evidence(policy: RoutePolicy, evidence: Evidence) -> dict[str, Any]:
    ramp = policy.ramp
    n, agreed = evidence.n, evidence.agreed
    lower, upper = wilson(agreed, n, ramp.z)
    return {
        "n": n,
        "agreed": agreed,
        "rate": agreed / n if n else None,
        "lower": lower,
        "upper": upper,
        "target": ramp.target,
        "floor": ramp.floor,
        "min_samples": ramp.min_samples,
    }


def _decide(
    policy: RoutePolicy,
    facts: dict[str, Any],
    action: Literal["hold", "raise", "rollback"],
    reason: str,
    *,
    share: float | None = None,
    mode: Mode | None = None,
) -> RampDecision:
    return RampDecision(
        action=action,
        share_before=policy.share,
        share_after=policy.share if share is None else share,
        mode_after=mode or policy.mode,
        reason=reason,
        evidence=facts,
    )
