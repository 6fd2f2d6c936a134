"""Agreement statistics: Wilson score bounds and a window of recent outcomes.

Ramp and calibration decisions use the bounds, not raw rates, so a handful of lucky
comparisons cannot raise a share and a handful of unlucky ones only roll it back when the
evidence really is bad.
"""

from __future__ import annotations

import math
from collections import deque


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; (0.0, 1.0) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denominator = 1 + z2 / n
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


class AgreementWindow:
    """The last ``window`` agreement outcomes (True = agreed), with their counts and bounds.

    ``reset`` on every share change, so the evidence counts only comparisons made since.
    """

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._agreed = 0

    def add(self, agreed: bool) -> None:
        """Record one outcome, forgetting the oldest when the window is full."""
        if len(self._outcomes) == self._outcomes.maxlen:
            self._agreed -= self._outcomes[0]
        self._outcomes.append(bool(agreed))
        self._agreed += bool(agreed)

    def reset(self) -> None:
        """Forget every outcome."""
        self._outcomes.clear()
        self._agreed = 0

    @property
    def window(self) -> int:
        return self._outcomes.maxlen or 0

    @property
    def n(self) -> int:
        """Outcomes held."""
        return len(self._outcomes)

    @property
    def agreed(self) -> int:
        """Outcomes held that agreed."""
        return self._agreed

    @property
    def rate(self) -> float | None:
        """Plain agreement rate; None when empty."""
        return self._agreed / self.n if self.n else None

    def bounds(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson interval of the agreement rate."""
        return wilson(self._agreed, self.n, z)
