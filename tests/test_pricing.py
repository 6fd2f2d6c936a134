"""PriceBook: dollars per call from genai-prices, config overrides, never zero for the unknown."""

from __future__ import annotations

import pytest

from arbitrage.config import PriceOverride
from arbitrage.pricing import PriceBook

# Published OpenAI prices of gpt-4o-mini, dollars per million tokens.
INPUT, CACHED_INPUT, OUTPUT = 0.15, 0.075, 0.6


def expected(prompt: int, cached: int, completion: int, rates=(INPUT, CACHED_INPUT, OUTPUT)) -> float:
    inp, cached_rate, out = rates
    return ((prompt - cached) * inp + cached * cached_rate + completion * out) / 1_000_000


def test_known_model_is_priced_from_the_published_rates():
    cost = PriceBook().price("gpt-4o-mini", 1200, 0, 300)
    assert cost == pytest.approx(expected(1200, 0, 300))


def test_cached_tokens_are_priced_at_the_cached_rate_only():
    cost = PriceBook().price("gpt-4o-mini", 1000, 400, 0)
    assert cost == pytest.approx((600 * INPUT + 400 * CACHED_INPUT) / 1_000_000)


def test_dated_model_name_has_the_same_price():
    assert PriceBook().price("gpt-4o-mini-2024-07-18", 1000, 200, 300) == pytest.approx(expected(1000, 200, 300))


def test_no_tokens_cost_nothing():
    assert PriceBook().price("gpt-4o-mini", 0, 0, 0) == 0


def test_override_wins_over_the_library():
    book = PriceBook({"gpt-4o-mini": PriceOverride(input_per_mtok=1.0, output_per_mtok=4.0,
                                                   cached_input_per_mtok=0.5)})
    assert book.price("gpt-4o-mini", 1000, 200, 300) == pytest.approx(expected(1000, 200, 300, (1.0, 0.5, 4.0)))


def test_override_cached_rate_defaults_to_the_input_rate():
    book = PriceBook({"private-model": PriceOverride(input_per_mtok=2.0, output_per_mtok=8.0)})
    assert book.price("private-model", 1000, 600, 10) == pytest.approx((1000 * 2.0 + 10 * 8.0) / 1_000_000)


def test_unknown_model_is_unpriced_not_free():
    assert PriceBook().price("no-such-model-anywhere-xyz", 1000, 0, 100) is None


def test_unknown_model_stays_unpriced_on_the_second_call():
    book = PriceBook()
    book.price("no-such-model-anywhere-xyz", 1, 0, 1)
    assert book.price("no-such-model-anywhere-xyz", 1, 0, 1) is None


@pytest.mark.parametrize("url", ["https://my-proxy.example.com/v1", "http://127.0.0.1:9999/v1"])
def test_non_openai_api_url_still_finds_the_model(url):
    cost = PriceBook().price("gpt-4o-mini", 1000, 200, 300, api_url=url)
    assert cost == pytest.approx(expected(1000, 200, 300))


def test_openai_provider_id_finds_the_model():
    assert PriceBook().price("gpt-4o-mini", 1000, 0, 0, provider="openai") == pytest.approx(expected(1000, 0, 0))


def test_price_scales_per_call_after_the_first_lookup():
    book = PriceBook()
    book.price("gpt-4o-mini", 1, 0, 1)
    assert book.price("gpt-4o-mini", 2000, 0, 0) == pytest.approx(expected(2000, 0, 0))
