"""Route policy: strict decoding, clear errors naming the field, round trips, changes."""

from __future__ import annotations

import re
import tomllib

import msgspec
import pytest

from arbitrage.errors import ConfigError
from router.policy import ComparatorSpec, RampSettings, RoutePolicy

CANARY = {"mode": "canary", "adapter": "banking/v3", "share": 10}


def test_toml_table_decodes_with_defaults():
    raw = tomllib.loads(
        """
        mode = "canary"
        adapter = "banking/v3"
        share = 25
        threshold = 0.8
        output = "json"
        comparator = { name = "json", keys = ["intent"] }
        [ramp]
        steps = [10, 50, 100]
        """
    )
    policy = RoutePolicy.from_dict(raw)
    assert (policy.share, policy.comparator.keys, policy.ramp.steps) == (25.0, ["intent"], [10.0, 50.0, 100.0])
    assert (policy.ramp.target, policy.confidence, policy.sticky) == (0.99, "joint", False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"share": 150}, "share must be within 0-100"),
        ({"share": -1}, "share must be within 0-100"),
        ({"threshold": 1.5}, "threshold must be within 0-1"),
        ({"shadow_rate": 2}, "shadow_rate must be within 0-1"),
        ({"audit_rate": -0.1}, "audit_rate must be within 0-1"),
        ({"local_timeout_s": 0}, "local_timeout_s must be > 0"),
        ({"mode": "canary", "share": 5}, "mode 'canary' needs an adapter"),
        ({"mode": "shadow", "adapter": "a/v1", "share": 5}, "share must be 0 in shadow mode"),
        ({"confidence": "vibes"}, "confidence: unknown scorer 'vibes'"),
        ({"json_schema": {"type": "object"}}, 'json_schema needs output = "json"'),
        ({"comparator": {"name": "bleu"}}, "comparator.name: unknown comparator 'bleu'"),
        ({"comparator": {"name": "exact", "keys": ["a"]}}, "comparator.keys applies only to the json"),
        ({"comparator": {"name": "json", "keys": []}}, "comparator.keys must name at least one key"),
        ({"comparator": {"name": "numeric", "tolerance": -1}}, "comparator.tolerance must be >= 0"),
        ({"comparator": {"name": "similarity", "min_similarity": 1.2}}, "comparator.min_similarity must be"),
        ({"comparator": {"name": "judge"}}, "comparator.judge_model is required"),
        ({"ramp": {"floor": 0.995}}, "ramp.floor (0.995) must not exceed ramp.target (0.99)"),
        ({"ramp": {"target": 1.5}}, "ramp.target must be within (0, 1]"),
        ({"ramp": {"steps": [5, 5, 10]}}, "ramp.steps must be strictly increasing"),
        ({"ramp": {"steps": [0, 50]}}, "ramp.steps must each be within (0, 100]"),
        ({"ramp": {"steps": [50, 120]}}, "ramp.steps must each be within (0, 100]"),
        ({"ramp": {"steps": []}}, "ramp.steps must list at least one share"),
        ({"ramp": {"min_samples": 0}}, "ramp.min_samples must be >= 1"),
        ({"ramp": {"window": 100, "min_samples": 200}}, "ramp.window (100) must be >= ramp.min_samples (200)"),
        ({"mode": "fast"}, "Invalid enum value 'fast' - at `$.mode`"),
        ({"share": "ten"}, "Expected `float`, got `str` - at `$.share`"),
        ({"shares": 10}, "unknown field `shares`"),
        ({"ramp": {"stepz": [1]}}, "unknown field `stepz` - at `$.ramp`"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match="^routes.\"p\": .*" + re.escape(message)):
        RoutePolicy.from_dict(fields, where='routes."p"')


def test_direct_construction_raises_config_error():
    with pytest.raises(ConfigError, match="share must be within 0-100"):
        RoutePolicy(share=101)
    with pytest.raises(ConfigError, match="ramp.floor"):
        RampSettings(target=0.9, floor=0.95)
    with pytest.raises(ConfigError, match="unknown comparator"):
        ComparatorSpec(name="nope")


def test_embedded_in_a_larger_document_the_error_has_its_location():
    class Routes(msgspec.Struct):
        routes: dict[str, RoutePolicy]

    # msgspec names the table but not the dict key: decode each route with from_dict(where=...)
    with pytest.raises(msgspec.ValidationError, match=r"share must be within 0-100.* at `\$\.routes"):
        msgspec.convert({"routes": {"banking": {"share": 300}}}, Routes)


def test_local_mode_means_share_100_unless_set():
    assert RoutePolicy(mode="local", adapter="a/v1").share == 100.0
    assert RoutePolicy(mode="local", adapter="a/v1", share=60).share == 60.0


def test_json_round_trip_and_plain_dict():
    policy = RoutePolicy.from_dict({**CANARY, "comparator": {"name": "numeric", "tolerance": 0.5}})
    data = policy.to_dict()
    assert data["comparator"] == {**data["comparator"], "name": "numeric", "tolerance": 0.5}
    assert RoutePolicy.from_json(msgspec.json.encode(data)) == policy


def test_bad_json_is_a_config_error():
    with pytest.raises(ConfigError, match="admin: .*JSON"):
        RoutePolicy.from_json(b"{not json", where="admin")
    with pytest.raises(ConfigError, match="admin: share must be within 0-100"):
        RoutePolicy.from_json(b'{"share": 101}', where="admin")


def test_with_changes_returns_a_validated_new_policy():
    policy = RoutePolicy.from_dict(CANARY)
    changed = policy.with_changes(share=50, comparator={"name": "json", "keys": ["intent"]})
    assert (changed.share, changed.comparator.keys, policy.share) == (50.0, ["intent"], 10.0)
    with pytest.raises(ConfigError, match="share must be within 0-100"):
        policy.with_changes(share=101)
    with pytest.raises(ConfigError, match="unknown field 'shares'"):
        policy.with_changes(shares=5)


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        RoutePolicy().share = 5  # type: ignore[misc]
