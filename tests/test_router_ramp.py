"""Ramp controller on synthetic evidence: up on good agreement, hold on too little, back on bad."""

from __future__ import annotations

from typing import NamedTuple

from router.policy import RampSettings, RoutePolicy
from router.ramp import next_share


class Counts(NamedTuple):
    n: int
    agreed: int


def policy(mode: str = "canary", share: float = 0.0, **fields) -> RoutePolicy:
    return RoutePolicy(mode=mode, adapter="banking/v1", share=share, **fields)


def test_first_step_takes_shadow_to_canary():
    decision = next_share(policy("shadow"), Counts(400, 400))  # lower bound 0.9905 >= 0.99
    assert (decision.action, decision.share_after, decision.mode_after) == ("raise", 1.0, "canary")
    assert decision.apply(policy("shadow")) == policy("canary", 1.0)


def test_raises_to_the_next_step_above_the_current_share():
    assert next_share(policy(share=10), Counts(400, 400)).share_after == 25.0
    assert next_share(policy(share=7), Counts(400, 400)).share_after == 10.0


def test_last_step_takes_canary_to_local():
    decision = next_share(policy(share=75), Counts(400, 400))
    assert (decision.action, decision.share_after, decision.mode_after) == ("raise", 100.0, "local")
    assert next_share(policy("local"), Counts(400, 400)).reason == "at_top"


def test_holds_on_too_few_samples_however_good():
    decision = next_share(policy(share=5), Counts(199, 199))
    assert (decision.action, decision.reason, decision.share_after) == ("hold", "too_few_samples", 5.0)


def test_holds_when_the_lower_bound_is_short_of_the_target():
    decision = next_share(policy(share=5), Counts(250, 250))  # rate 1.0, lower bound 0.985
    assert (decision.action, decision.reason) == ("hold", "within_bounds")
    assert next_share(policy(share=5), Counts(400, 392)).reason == "within_bounds"  # 98%: upper 0.993


def test_rolls_back_to_shadow_when_the_upper_bound_is_below_the_floor():
    decision = next_share(policy("local"), Counts(50, 40))  # upper bound 0.89
    assert (decision.action, decision.share_before, decision.share_after) == ("rollback", 100.0, 0.0)
    assert decision.apply(policy("local")) == policy("shadow")


def test_clear_bad_news_needs_no_minimum_sample():
    assert next_share(policy(share=50), Counts(10, 2)).action == "rollback"


def test_shadow_mode_with_bad_agreement_has_nothing_to_roll_back():
    decision = next_share(policy("shadow"), Counts(100, 50))
    assert (decision.action, decision.reason, decision.mode_after) == ("hold", "below_floor", "shadow")


def test_disabled_ramp_and_mode_off_hold():
    disabled = policy(share=10, ramp=RampSettings(enabled=False))
    assert next_share(disabled, Counts(400, 0)).reason == "ramp_disabled"
    assert next_share(RoutePolicy(), Counts(400, 400)).reason == "mode_off"


def test_decision_carries_its_evidence():
    evidence = next_share(policy(share=5), Counts(400, 392)).evidence
    assert {k: evidence[k] for k in ("n", "agreed", "rate", "target", "floor", "min_samples")} == {
        "n": 400, "agreed": 392, "rate": 0.98, "target": 0.99, "floor": 0.95, "min_samples": 200,
    }
    assert 0.96 < evidence["lower"] < 0.98 < evidence["upper"] < 0.995


def test_a_raise_then_fresh_evidence_that_rolls_back():
    shadow = policy("shadow")
    decision = next_share(shadow, Counts(400, 400))
    assert decision.action == "raise"
    canary = decision.apply(shadow)  # a new policy: its evidence starts afresh
    assert (canary.mode, canary.share) == ("canary", 1.0)
    assert next_share(canary, Counts(0, 0)).reason == "too_few_samples"
    decision = next_share(canary, Counts(20, 0))
    assert decision.action == "rollback"
    assert (decision.apply(canary).mode, decision.apply(canary).share) == ("shadow", 0.0)
