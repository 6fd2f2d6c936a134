"""Ramp controller: raise a path's local share step by step on evidence, roll it back on bad news.

Pure: given the policy and the agreement evidence gathered since the last share change, say
what to do. ``raise`` when the Wilson lower bound of agreement is >= ``ramp.target`` with at
least ``ramp.min_samples`` comparisons; ``rollback`` (to shadow mode, share 0) when the upper
bound is < ``ramp.floor``, however few the comparisons (a low upper bound is already strong
evidence); otherwise ``hold``. Shadow -> canary on the first step, canary -> local at 100.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import msgspec

from router.comparators import Comparison
from router.policy import Mode, RoutePolicy
from router.stats import AgreementWindow, wilson


class Evidence(Protocol):
    """Agreement counts since the last share change (an ``AgreementWindow`` is one)."""

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


class RampController:
    """One path's ramp: collects agreement outcomes, decides, and forgets the evidence after
    every change so the next decision rests only on comparisons made at the new share."""

    def __init__(self, policy: RoutePolicy) -> None:
        self.policy = policy
        self.window = AgreementWindow(policy.ramp.window)

    def record(self, agreed: bool) -> None:
        """Add one comparison outcome."""
        self.window.add(agreed)

    def record_comparison(self, comparison: Comparison) -> bool:
        """Add a comparator's result; one whose upstream answer could not be judged
        (``comparable`` false) is no evidence and is skipped. True when it was counted."""
        if comparison.comparable:
            self.window.add(comparison.agreed)
        return comparison.comparable

    def step(self) -> RampDecision:
        """Decide on the evidence so far; on a change, adopt the new policy and reset the window."""
        decision = next_share(self.policy, self.window)
        if decision.action != "hold":
            self.policy = decision.apply(self.policy)
            self.window.reset()
        return decision

    def set_policy(self, policy: RoutePolicy) -> None:
        """Adopt a policy changed by hand; the evidence restarts when mode or share changed."""
        if (policy.mode, policy.share) != (self.policy.mode, self.policy.share):
            self.window.reset()
        if policy.ramp.window != self.window.window:
            self.window = AgreementWindow(policy.ramp.window)
        self.policy = policy
