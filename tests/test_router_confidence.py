"""Confidence scorers on hand-made log-probs."""

from __future__ import annotations

import math

import pytest

from router.confidence import choice_logprobs, register_scorer, score, scorer_names


def tokens(*probabilities: float) -> list[dict]:
    return [{"token": f"t{i}", "logprob": math.log(p), "top_logprobs": []} for i, p in enumerate(probabilities)]


def test_joint_is_the_product_of_token_probabilities():
    assert score(tokens(0.9, 0.5, 0.8), "joint") == pytest.approx(0.36)


def test_min_is_the_least_likely_token():
    assert score(tokens(0.9, 0.5, 0.8), "min") == pytest.approx(0.5)


def test_mean_is_the_geometric_mean():
    assert score(tokens(0.5, 0.125), "mean") == pytest.approx(0.25)  # sqrt(1/16)


def test_default_method_is_joint():
    assert score(tokens(0.5, 0.5)) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "content",
    [None, [], [{"token": "a"}], [{"token": "a", "logprob": None}], [{"token": "a", "logprob": float("nan")}]],
)
def test_missing_or_unusable_logprobs_score_zero(content):
    assert score(content, "joint") == 0.0
    assert score(content, "min") == 0.0


def test_one_token_without_logprob_makes_the_whole_answer_unscored():
    content = tokens(0.99, 0.99) + [{"token": "x"}]
    assert score(content, "min") == 0.0


def test_scores_stay_within_0_and_1():
    assert score([{"token": "a", "logprob": 0.0001}], "joint") == 1.0
    assert score([{"token": "a", "logprob": -math.inf}], "joint") == 0.0
    assert score([{"token": "a", "logprob": -9999.0}], "min") == 0.0


def test_unknown_scorer_is_an_error():
    with pytest.raises(ValueError, match="unknown confidence scorer 'vibes'"):
        score(tokens(0.9), "vibes")


def test_a_scorer_can_be_plugged_in_by_name():
    register_scorer("first_token", lambda logprobs: math.exp(logprobs[0]))
    assert "first_token" in scorer_names()
    assert score(tokens(0.7, 0.1), "first_token") == pytest.approx(0.7)


def test_choice_logprobs_reads_chat_completions_responses():
    content = tokens(0.9)
    assert choice_logprobs({"choices": [{"logprobs": {"content": content}}]}) == content
    assert choice_logprobs({"choices": [{"logprobs": None}]}) is None
    assert choice_logprobs({"choices": []}) is None
