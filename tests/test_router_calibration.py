"""Calibration on synthetic evidence small enough to check by hand."""

from __future__ import annotations

import pytest

from router.calibration import CurvePoint, at_target, calibrate, curve
from router.stats import wilson

# 4 sure and right, 2 middling (one right), 4 unsure and wrong.
POINTS = [(0.9, True)] * 4 + [(0.7, True), (0.7, False)] + [(0.5, False)] * 4


def test_curve_has_one_point_per_distinct_confidence_ascending():
    assert curve(POINTS) == [
        CurvePoint(0.5, 1.0, 0.5, wilson(5, 10)[0], 10),
        CurvePoint(0.7, 0.6, 5 / 6, wilson(5, 6)[0], 6),
        CurvePoint(0.9, 0.4, 1.0, wilson(4, 4)[0], 4),
    ]


def test_curve_of_nothing_is_empty():
    assert curve([]) == []
    assert calibrate([], target=0.5, min_samples=1) is None


@pytest.mark.parametrize(
    ("target", "min_samples", "threshold"),
    [
        (0.5, 1, 0.9),  # lower bounds: 0.510 at 0.9, 0.436 at 0.7, 0.237 at 0.5
        (0.4, 1, 0.7),
        (0.2, 1, 0.5),
        (0.5, 5, None),  # only 0.9 clears the bound, and it has 4 samples
        (0.6, 1, None),
    ],
)
def test_calibrate_picks_the_lowest_threshold_whose_lower_bound_clears_the_target(target, min_samples, threshold):
    assert calibrate(POINTS, target=target, min_samples=min_samples) == threshold


def test_calibrate_at_realistic_scale():
    points = [(0.95, True)] * 600 + [(0.3, True)] * 200 + [(0.3, False)] * 200
    assert calibrate(points, target=0.99, min_samples=200) == 0.95  # 600/600: lower bound 0.9936
    assert calibrate(points, target=0.99, min_samples=700) is None
    assert calibrate(points[:300], target=0.99, min_samples=200) is None  # 300/300: lower bound 0.9874


def test_at_target_uses_the_plain_agreement():
    assert at_target(POINTS, 0.8) == curve(POINTS)[1]
    assert at_target(POINTS, 1.0).threshold == 0.9
    assert at_target(POINTS, 0.5).coverage == 1.0
    assert at_target([(0.9, False)], 0.5) is None
