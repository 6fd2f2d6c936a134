"""Per-key request rate limits and spend budgets, checked before a call goes upstream.

Rate: a token bucket per key, ``rpm`` tokens deep and refilled at ``rpm / 60`` per
second; a request without a token gets a 429 with ``Retry-After``. A small bucket
rather than a library: ``aiolimiter`` waits for capacity instead of refusing, and
``limits`` offers windows (not a bucket) and a memory store with a timer thread; this
is O(1), allocation-free after the first request, and gives the exact wait.

Spend: a call's cost is known only after the upstream answered, so it is added when
the call is recorded. A request that arrives when the key's UTC-day or UTC-month
spend has reached its budget is refused (429, ``insufficient_quota``); calls already
in flight may overshoot by their own cost. At start, the month so far is summed from
the capture store, so a restart does not reset a budget.

Counted per process: with N workers a key can get up to N x ``rpm``, and each worker
sees the other workers' spend only from its own start (see the README).
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from arbitrage.errors import BudgetExceededError, RateLimitError, StoreError
from arbitrage.keys import KeyEntry

log = logging.getLogger(__name__)


class TokenBucket:
    """``per_minute`` requests a minute, in bursts of up to ``per_minute``."""

    __slots__ = ("per_minute", "_rate", "_tokens", "_stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._tokens = float(per_minute)
        self._stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when taken, else the seconds until one is there."""
        self._tokens = min(self.per_minute, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


class SpendLedger:
    """Dollars spent per key in the current UTC day and month."""

    def __init__(self) -> None:
        self._day: dict[str, float] = {}
        self._month: dict[str, float] = {}
        self._period = _periods(datetime.now(UTC))

    def add(self, key_id: str, cost_usd: float, now: datetime | None = None) -> None:
        self._roll(now or datetime.now(UTC))
        self._day[key_id] = self._day.get(key_id, 0.0) + cost_usd
        self._month[key_id] = self._month.get(key_id, 0.0) + cost_usd

    def spent(self, key_id: str, now: datetime | None = None) -> tuple[float, float]:
        """(today, this month) in dollars."""
        self._roll(now or datetime.now(UTC))
        return self._day.get(key_id, 0.0), self._month.get(key_id, 0.0)

    def load(self, day: dict[str, float], month: dict[str, float], now: datetime) -> None:
        """Replace the totals with ones summed elsewhere (the capture store) for ``now``'s periods."""
        self._period = _periods(now)
        self._day, self._month = dict(day), dict(month)

    def _roll(self, now: datetime) -> None:
        period = _periods(now)
        if period == self._period:
            return
        if period[1] != self._period[1]:
            self._month = {}
        self._day = {}
        self._period = period


def _periods(now: datetime) -> tuple[str, str]:
    return now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")


class Quotas:
    """Admits or refuses requests by their key's limits, and keeps the spend."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.ledger = SpendLedger()
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, key: KeyEntry) -> None:
        """Raise RateLimitError or BudgetExceededError (429) when the key may not start a call now."""
        if key.rpm:
            self._take_token(key)
        if key.budget_usd_day is None and key.budget_usd_month is None:
            return
        day, month = self.ledger.spent(key.id)
        for spent, budget, period in ((day, key.budget_usd_day, "daily"), (month, key.budget_usd_month, "monthly")):
            if budget is not None and spent >= budget:
                raise BudgetExceededError(
                    f"This gateway key has used its {period} budget (${spent:.4f} of ${budget:.2f}).",
                    code="budget_exceeded", retry_after_s=_until_next(period))

    def spend(self, key_id: str, cost_usd: float | None) -> None:
        """Count what a finished call cost (unpriced calls count nothing)."""
        if cost_usd:
            self.ledger.add(key_id, cost_usd)

    def _take_token(self, key: KeyEntry) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(key.id)
        if bucket is None or bucket.per_minute != key.rpm:
            bucket = self._buckets[key.id] = TokenBucket(key.rpm, now)
        wait = bucket.take(now)
        if wait:
            raise RateLimitError(f"This gateway key is limited to {key.rpm} requests per minute; "
                                 f"retry in {wait:.1f} s.", code="rate_limit_exceeded", retry_after_s=wait)

    def restore(self) -> None:
        """Sum this UTC day's and month's spend per key from the capture store."""
        now = datetime.now(UTC)
        try:
            day, month = spend_from_store(self.data_dir, now)
        except StoreError as exc:
            log.warning("spend budgets start from zero: the capture store could not be read (%s)", exc)
            return
        self.ledger.load(day, month, now)
        if month:
            log.info("spend this month restored for %d keys from the capture store", len(month))

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        """Restore the spend at start (after the store is open)."""
        self.restore()
        yield


def spend_from_store(data_dir: Path, now: datetime) -> tuple[dict[str, float], dict[str, float]]:
    """(today's, this month's) dollars per key id, from the ``calls`` table."""
    import duckdb

    from arbitrage.capture.store import connect

    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        rows = connect(data_dir).execute(
            "SELECT key_id, sum(cost_usd) FILTER (WHERE ts >= $day), sum(cost_usd) FROM calls "
            "WHERE ts >= $month AND cost_usd IS NOT NULL GROUP BY key_id",
            {"day": day_start, "month": month_start}).fetchall()
    except duckdb.Error as exc:
        raise StoreError(str(exc)) from exc
    return {k: d for k, d, _ in rows if d}, {k: m for k, _, m in rows if m}


def _until_next(period: str) -> float:
    now = datetime.now(UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return 86400 - (now - start).total_seconds()
    month = start.replace(day=1)
    following = month.replace(year=month.year + month.month // 12, month=month.month % 12 + 1)
    return (following - now).total_seconds()
