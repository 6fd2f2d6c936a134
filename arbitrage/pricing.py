"""Dollars per call, from the maintained ``genai-prices`` tables or config overrides.

An unknown model is never priced as zero: ``price()`` returns ``None`` and the
caller records the call as unpriced (and it is counted in metrics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

from genai_prices import Usage, calc_price

from arbitrage.config import PriceOverride

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rates:
    """Flat dollars per million tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        uncached = max(prompt_tokens - cached_tokens, 0)
        total = uncached * self.input + cached_tokens * self.cached_input + completion_tokens * self.output
        return total / 1_000_000


Pricer = Callable[[int, int, int], float]


class PriceBook:
    """Looks a model's price up once, then prices each call in about a microsecond."""

    def __init__(self, overrides: dict[str, PriceOverride] | None = None) -> None:
        self._overrides = overrides or {}
        self._cache: dict[tuple[str | None, str], Pricer | None] = {}

    def price(
        self, model: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
        provider: str | None = None, api_url: str | None = None,
    ) -> float | None:
        """Dollars for one call, or None when the model's price is unknown.

        ``provider`` (a genai-prices provider id) or ``api_url`` (the upstream's base URL)
        narrow the lookup; without either the model name alone decides.
        """
        key = (provider or api_url, model)
        if key not in self._cache:
            self._cache[key] = self._resolve(model, provider, api_url)
        pricer = self._cache[key]
        return pricer(prompt_tokens, cached_tokens, completion_tokens) if pricer else None

    def _resolve(self, model: str, provider: str | None, api_url: str | None) -> Pricer | None:
        if model in self._overrides:
            o = self._overrides[model]
            cached = o.cached_input_per_mtok if o.cached_input_per_mtok is not None else o.input_per_mtok
            return Rates(o.input_per_mtok, cached, o.output_per_mtok).cost
        try:
            found = calc_price(Usage(), model_ref=model, provider_id=provider, provider_api_url=api_url)
        except LookupError:
            if api_url and not provider:
                return self._resolve(model, None, None)
            log.warning("no price known for model %r (provider %r): calls are recorded unpriced; "
                        "add [prices.\"%s\"] to the config", model, provider, model)
            return None
        return _flat_rates(found.model_price) or _tiered_pricer(found.model_price)


def _flat_rates(model_price) -> Pricer | None:
    """The fast path for the common case: plain per-token prices."""
    inp, out = model_price.input_mtok, model_price.output_mtok or Decimal(0)
    cached = model_price.cache_read_mtok if model_price.cache_read_mtok is not None else inp
    if all(isinstance(v, Decimal) for v in (inp, out, cached)):
        return Rates(float(inp), float(cached), float(out)).cost
    return None


def _tiered_pricer(model_price) -> Pricer:
    """Tiered prices (by context length): let the library compute each call."""

    def pricer(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        usage = Usage(input_tokens=prompt_tokens, cache_read_tokens=cached_tokens, output_tokens=completion_tokens)
        return float(model_price.calc_price(usage)["total_price"])

    return pricer
