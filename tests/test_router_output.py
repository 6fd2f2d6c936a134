"""Output check of a local answer: text, JSON, JSON Schema."""

from __future__ import annotations

import pytest

from arbitrage.errors import ConfigError
from router.policy import RoutePolicy

SCHEMA = {
    "type": "object",
    "properties": {"intent": {"enum": ["refund", "card_lost"]}},
    "required": ["intent"],
}


def test_text_accepts_any_non_empty_answer():
    check = RoutePolicy().output_check()
    assert check.check("whatever {").ok
    assert check.check("  \n") == (False, "empty answer")


def test_json_needs_a_parseable_answer():
    check = RoutePolicy(output="json").output_check()
    assert check.check('{"intent": "refund"}').ok
    verdict = check.check('{"intent": "refund"')
    assert not verdict.ok and verdict.detail.startswith("not JSON")


def test_json_schema_is_enforced_with_the_place_of_the_mismatch():
    check = RoutePolicy(output="json", json_schema=SCHEMA).output_check()
    assert check.check('{"intent": "refund"}').ok
    verdict = check.check('{"intent": "pizza"}')
    assert not verdict.ok and verdict.detail.startswith("schema mismatch at intent:")
    assert check.check("[]").detail.startswith("schema mismatch at (root):")


def test_an_invalid_schema_is_a_config_error():
    with pytest.raises(ConfigError, match="json_schema is not a valid JSON Schema"):
        RoutePolicy.from_dict({"output": "json", "json_schema": {"type": "objekt"}})
