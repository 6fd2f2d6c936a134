"""Wilson bounds against known values."""

from __future__ import annotations

import pytest

from router.stats import wilson


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_matches_known_values(successes, n, low, high):
    assert wilson(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_with_no_samples_knows_nothing():
    assert wilson(0, 0) == (0.0, 1.0)


def test_wilson_narrows_with_z_and_samples():
    assert wilson(80, 100, z=1.0)[0] > wilson(80, 100, z=1.96)[0]
    assert wilson(800, 1000)[0] > wilson(80, 100)[0]


@pytest.mark.parametrize(("successes", "n"), [(3, 2), (-1, 5), (0, -1)])
def test_wilson_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError):
        wilson(successes, n)
