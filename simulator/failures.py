"""Failure modes chosen by the requested model name, so a gateway's tests reach every path.

The name is ``MODE`` or ``MODE:REALMODEL`` (``flaky-30:gpt-4o-mini``); any other name is a
plain model, answered normally. Modes:

    error-NNN   always that status (400-599) with OpenAI's body; error-429 adds Retry-After: 1
    slow        answers after an extra ``slow_ms``
    flaky-N     N % of requests (seeded draws) fail with 500
    recover-N   the first N requests with the same (model, text) fail with 503, Retry-After: 0
    cutoff      the connection is aborted part-way through the answer
    hang        the request is never answered (until the client goes away, or an hour passes)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from simulator.errors import InvalidRequest, RateLimited, SimulatedFailure

_MODE = re.compile(r"(?P<mode>error|flaky|recover)-(?P<argument>\d+)|(?P<bare>slow|cutoff|hang)")
_ARGUMENT_RANGES = {"error": range(400, 600), "flaky": range(0, 101), "recover": range(0, 10**6)}


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """What a requested model name asks for."""

    mode: str | None
    """The failure mode (``error``, ``slow``, ``flaky``, ...), or None for a plain model."""
    argument: int
    """The mode's number: status for ``error``, percent for ``flaky``, count for ``recover``."""
    reply_model: str
    """The ``model`` reported in the answer."""


@lru_cache(maxsize=4096)
def parse_model_name(name: str, default_model: str) -> ModelChoice:
    """Split ``MODE[:REALMODEL]``; a name that is not a mode is a plain model."""
    head, _, real_model = name.partition(":")
    match = _MODE.fullmatch(head)
    if match is None:
        return ModelChoice(None, 0, name)
    mode = match["mode"] or match["bare"]
    argument = int(match["argument"] or 0)
    if mode in _ARGUMENT_RANGES and argument not in _ARGUMENT_RANGES[mode]:
        raise InvalidRequest(f"Simulator mode '{head}' is out of range.", param="model",
                             code="invalid_value")
    return ModelChoice(mode, argument, real_model or default_model)


class FailureInjector:
    """Decides whether a request fails; flaky draws are seeded, recover counts are per key."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(f"flaky-{seed}")
        self._attempts: dict[tuple[str, str], int] = {}

    def check(self, choice: ModelChoice, model: str, text: str) -> None:
        """Raise the failure the mode asks for on this request, if any."""
        if choice.mode == "error":
            raise_status(choice.argument, choice.reply_model)
        elif choice.mode == "flaky" and self._random.random() * 100 < choice.argument:
            raise SimulatedFailure(500)
        elif choice.mode == "recover" and self._attempt(model, text) <= choice.argument:
            raise SimulatedFailure(503, headers={"retry-after": "0"})

    def _attempt(self, model: str, text: str) -> int:
        """Count this request among those with the same (model, text); returns its number."""
        key = (model, text)
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        return attempt


def raise_status(status: int, reply_model: str) -> None:
    """Raise the failure OpenAI sends with this status."""
    if status == 429:
        raise RateLimited(reply_model)
    raise SimulatedFailure(status)
