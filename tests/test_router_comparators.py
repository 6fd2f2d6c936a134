"""Comparators on agreeing, disagreeing and garbage answers (the judge with a fake `ask`)."""

from __future__ import annotations

import pytest

from router.comparators import Comparison, make_comparator, parse_verdict
from router.policy import ComparatorSpec


def comparator(name: str, **options):
    return make_comparator(ComparatorSpec(name=name, **options))


def test_exact_ignores_surrounding_whitespace_only():
    exact = comparator("exact")
    assert exact.compare("  refund\n", "refund").agreed
    assert not exact.compare("refund", "Refund").agreed
    assert not exact.compare("a b", "a  b").agreed


def test_json_compares_values_not_text():
    json_ = comparator("json")
    assert json_.compare('{"a": 1, "b": [1, 2]}', '{"b":[1,2],"a":1.0}').agreed
    assert not json_.compare('{"a": [1, 2]}', '{"a": [2, 1]}').agreed
    assert not json_.compare('{"a": true}', '{"a": 1}').agreed
    assert not json_.compare('{"a": null}', '{}').agreed


def test_json_with_keys_compares_only_those_keys():
    json_ = comparator("json", keys=["intent"])
    assert json_.compare('{"intent": "refund", "why": "x"}', '{"why": "y", "intent": "refund"}').agreed
    assert json_.compare('{"intent": "card_lost"}', '{"intent": "refund"}') == Comparison(False, "key 'intent' differs")
    assert json_.compare('{"intent": "refund"}', '{"label": "refund"}').detail == "local answer lacks key 'intent'"
    assert json_.compare('{"intent": "refund"}', '["refund"]').detail == "local answer is not a JSON object"


def test_json_unparseable_local_is_disagreement_with_detail():
    result = comparator("json").compare('{"intent": "refund"}', '{"intent": "refund"')
    assert not result.agreed and result.comparable
    assert result.detail.startswith("local answer is not JSON")


def test_json_unparseable_upstream_is_said_and_not_comparable():
    result = comparator("json").compare("Sure! Here it is", '{"intent": "refund"}')
    assert (result.agreed, result.comparable) == (False, False)
    assert result.detail.startswith("upstream answer is not JSON")
    assert not comparator("json", keys=["intent"]).compare('{"x": 1}', '{"intent": 1}').comparable


def test_json_rejects_non_json_constants():
    assert not comparator("json").compare("NaN", "NaN").agreed


def test_numeric_compares_first_numbers_within_absolute_tolerance():
    numeric = comparator("numeric", tolerance=0.5)
    assert numeric.compare("The total is 41.6 EUR", "42").agreed
    assert numeric.compare("-3e2 degrees", "about -300.4").agreed
    assert not numeric.compare("The total is 41.4", "42 (or 43)").agreed
    assert comparator("numeric").compare("7", "7.0").agreed


def test_numeric_without_numbers():
    numeric = comparator("numeric")
    assert numeric.compare("12", "twelve") == Comparison(False, "no number in the local answer")
    assert not numeric.compare("twelve", "12").comparable


def test_similarity_uses_a_ratio_threshold():
    similar = comparator("similarity", min_similarity=0.8)
    assert similar.compare("The card was lost yesterday.", "The card was lost yesterday!").agreed
    assert not similar.compare("The card was lost yesterday.", "Refund the transfer.").agreed
    assert comparator("similarity", min_similarity=1.0).compare(" same ", "same").agreed
    assert similar.compare("abcd", "abce").detail == "similarity 0.750"


async def test_sync_comparators_also_answer_acompare():
    assert (await comparator("exact").acompare("a", "a")).agreed
    assert not (await comparator("json").acompare("{}", "[")).agreed


def fake_judge(verdict: str, prompts: list[str]):
    async def ask(prompt: str) -> str:
        prompts.append(prompt)
        return verdict

    return make_comparator(ComparatorSpec(name="judge", judge_model="gpt-4o"), ask=ask)


@pytest.mark.parametrize(("verdict", "agreed"), [("yes", True), ("Yes.", True), (" NO\n", False), ('"no"', False)])
async def test_judge_parses_a_yes_or_no_verdict(verdict, agreed):
    prompts: list[str] = []
    result = await fake_judge(verdict, prompts).acompare("refund", "a refund", question="Where is my money?")
    assert result.agreed is agreed
    assert "refund" in prompts[0] and "a refund" in prompts[0] and "Where is my money?" in prompts[0]


@pytest.mark.parametrize("verdict", ["maybe", "yes, mostly", "yes no", "", "Nope"])
async def test_judge_garbage_verdict_is_not_agreement(verdict):
    result = await fake_judge(verdict, []).acompare("a", "a")
    assert not result.agreed
    assert result.detail.startswith("unparseable judge verdict")


async def test_judge_call_failure_propagates():
    async def ask(prompt: str) -> str:
        raise ConnectionError("upstream down")

    judge = make_comparator(ComparatorSpec(name="judge", judge_model="gpt-4o"), ask=ask)
    with pytest.raises(ConnectionError):
        await judge.acompare("a", "b")


def test_judge_is_async_only_and_needs_ask():
    with pytest.raises(TypeError, match="acompare"):
        fake_judge("yes", []).compare("a", "a")
    with pytest.raises(ValueError, match="needs an `ask`"):
        make_comparator(ComparatorSpec(name="judge", judge_model="gpt-4o"))


def test_parse_verdict_is_strict():
    assert parse_verdict("**Yes**").agreed
    assert not parse_verdict("yes because").agreed
