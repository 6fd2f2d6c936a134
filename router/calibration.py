"""Threshold calibration from shadow evidence: (confidence, agreed) pairs.

Serving only answers with confidence >= t gives a coverage (share of answers served) and an
agreement among them. ``calibrate`` picks the lowest t (the most coverage) whose agreement has
a Wilson lower bound at or above the target, with enough samples behind it (RouteLLM's
``calibrate_threshold`` idea, with a confidence bound instead of a raw rate).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby
from typing import NamedTuple

from router.stats import wilson


class CurvePoint(NamedTuple):
    """Serving only answers with confidence >= ``threshold``."""

    threshold: float
    coverage: float
    """Share of all answers served (0-1)."""
    agreement: float
    """Agreement among those served (0-1)."""
    lower_bound: float
    """Wilson lower bound of that agreement."""
    n: int
    """Answers served."""


def curve(points: Iterable[tuple[float, bool]], z: float = 1.96) -> list[CurvePoint]:
    """One point per distinct confidence value, by threshold ascending; [] without points."""
    ordered = sorted(((float(c), bool(a)) for c, a in points), key=lambda p: p[0], reverse=True)
    total, served, agreed = len(ordered), 0, 0
    result = []
    for confidence, group in groupby(ordered, key=lambda p: p[0]):
        outcomes = [a for _, a in group]
        served += len(outcomes)
        agreed += sum(outcomes)
        low, _ = wilson(agreed, served, z)
        result.append(CurvePoint(confidence, served / total, agreed / served, low, served))
    result.reverse()
    return result


def calibrate(
    points: Iterable[tuple[float, bool]], target: float, z: float = 1.96, min_samples: int = 200
) -> float | None:
    """Lowest threshold whose served answers number >= ``min_samples`` and whose agreement
    has a Wilson lower bound >= ``target``; None when no threshold qualifies."""
    for point in curve(points, z):
        if point.n >= min_samples and point.lower_bound >= target:
            return point.threshold
    return None


def at_target(points: Iterable[tuple[float, bool]], target: float) -> CurvePoint | None:
    """The point of most coverage whose plain agreement is >= ``target`` (for reports:
    "x% of answers servable at y% agreement"); None when none reaches it."""
    return next((p for p in curve(points) if p.agreement >= target), None)
