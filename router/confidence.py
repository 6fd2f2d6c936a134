"""Confidence of a local answer, in [0, 1], from its token log-probabilities.

Input is OpenAI's chat-completions ``choices[0].logprobs.content``: a list of
``{"token", "logprob", "bytes", "top_logprobs"}`` dicts. Missing or empty log-probs, or a
token without a finite log-prob, score 0.0, so the answer falls back upstream rather than
being served on no evidence. vLLM reports raw log-probs (before temperature) by default.

Scorers are looked up by name (the policy's ``confidence`` field); ``register_scorer`` plugs
in another one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Scorer = Callable[[Sequence[float]], float]
"""Maps the answer's token log-probs (non-empty, finite, <= 0) to a confidence in [0, 1]."""

_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, scorer: Scorer) -> None:
    """Make ``scorer`` available under ``name`` (replaces a scorer of the same name)."""
    _SCORERS[name] = scorer


def scorer_names() -> list[str]:
    """Names of the registered scorers."""
    return sorted(_SCORERS)


def score(content: Sequence[dict[str, Any]] | None, method: str = "joint") -> float:
    """Confidence of one answer by the scorer ``method``; 0.0 without usable log-probs."""
    try:
        scorer = _SCORERS[method]
    except KeyError:
        raise ValueError(f"unknown confidence scorer {method!r} (known: {', '.join(scorer_names())})") from None
    logprobs = token_logprobs(content)
    if not logprobs:
        return 0.0
    return min(1.0, max(0.0, scorer(logprobs)))


def token_logprobs(content: Sequence[dict[str, Any]] | None) -> list[float] | None:
    """The log-probs of ``content``, clipped to <= 0; None when any is missing or not finite."""
    if not content:
        return None
    values = []
    for token in content:
        value = token.get("logprob") if isinstance(token, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value == math.inf:
            return None
        values.append(min(0.0, float(value)))
    return values


def choice_logprobs(response: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``choices[0].logprobs.content`` of a chat-completions response, or None."""
    try:
        return response["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return None


def joint(logprobs: Sequence[float]) -> float:
    """Probability of the whole answer: exp(sum of log-probs)."""
    return math.exp(math.fsum(logprobs))


def minimum(logprobs: Sequence[float]) -> float:
    """Probability of the least likely token: exp(min log-prob)."""
    return math.exp(min(logprobs))


def mean(logprobs: Sequence[float]) -> float:
    """Geometric mean probability per token: exp(mean log-prob); does not fall with length."""
    return math.exp(math.fsum(logprobs) / len(logprobs))


register_scorer("joint", joint)
register_scorer("min", minimum)
register_scorer("mean", mean)
