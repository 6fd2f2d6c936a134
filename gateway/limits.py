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

With ``workers = N``, the buckets and the spend live in one SQLite file that every worker
uses (``SharedLimits``), so a key gets ``rpm`` requests a minute and one budget in all, not
N of each. ``serve`` creates the file in the run's temporary folder and sums the spend into
it from the capture store before the workers start; a worker that uvicorn restarts finds it
as the others left it. One process keeps the same state in memory (``LocalLimits``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from arbitrage.capture.migrations import SCHEMA_FILE
from arbitrage.errors import BudgetExceededError, RateLimitError, StoreError
from arbitrage.keys import KeyEntry
from gateway.shared_sqlite import SharedSQLite

log = logging.getLogger(__name__)

SHARED_LIMITS_ENV = "ARBITRAGE_SHARED_LIMITS"
"""Names the workers' shared limits file (set by ``serve`` for ``workers`` > 1)."""


class TokenBucket:
    """``per_minute`` requests a minute, in bursts of up to ``per_minute``."""

    __slots__ = ("per_minute", "_rate", "_tokens", "_stamp")

    def __init__(self, per_minute: int, now: float, tokens: float | None = None) -> None:
        """A full bucket, or one holding ``tokens`` as of ``now``."""
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._tokens = float(per_minute) if tokens is None else tokens
        self._stamp = now

    @property
    def state(self) -> tuple[float, float]:
        """(tokens, as of when): what ``TokenBucket(per_minute, when, tokens)`` restores."""
        return self._tokens, self._stamp

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


class LocalLimits:
    """One process's buckets and spend, in memory."""

    def __init__(self) -> None:
        self.ledger = SpendLedger()
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key_id: str, per_minute: int, now: float) -> float:
        """Take one of the key's tokens: 0.0 when taken, else the seconds until one is there."""
        bucket = self._buckets.get(key_id)
        if bucket is None or bucket.per_minute != per_minute:
            bucket = self._buckets[key_id] = TokenBucket(per_minute, now)
        return bucket.take(now)

    def add(self, key_id: str, cost_usd: float) -> None:
        self.ledger.add(key_id, cost_usd)

    def spent(self, key_id: str) -> tuple[float, float]:
        return self.ledger.spent(key_id)

    def load(self, day: dict[str, float], month: dict[str, float], now: datetime) -> None:
        self.ledger.load(day, month, now)


class SharedLimits:
    """The buckets and spend of every worker of one gateway, in one SQLite file
    (``SharedSQLite``: each token taken is one short write transaction).

    Spend is kept per key and period ("2026-12-07", "2026-12"), so a new day or month starts from
    nothing by itself.
    """

    FILE = "limits.sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = SharedSQLite(path, "the workers' shared limits")
        with self.file.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS buckets "
                       "(key_id TEXT PRIMARY KEY, per_minute INTEGER, tokens REAL, stamp REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS spend (key_id TEXT, period TEXT, usd REAL, "
                       "PRIMARY KEY (key_id, period))")

    def take(self, key_id: str, per_minute: int, now: float) -> float:
        """As ``LocalLimits.take``, for every worker at once (``now`` is ``time.monotonic()``,
        one clock for all processes of the machine)."""
        with self.file.transaction() as db:
            row = db.execute("SELECT per_minute, tokens, stamp FROM buckets WHERE key_id = ?", (key_id,)).fetchone()
            bucket = (TokenBucket(per_minute, row[2], row[1]) if row and row[0] == per_minute
                      else TokenBucket(per_minute, now))
            wait = bucket.take(now)
            db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?)", (key_id, per_minute, *bucket.state))
        return wait

    def add(self, key_id: str, cost_usd: float) -> None:
        day, month = _periods(datetime.now(UTC))
        with self.file.transaction() as db:
            db.executemany("INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET usd = usd + excluded.usd",
                           [(key_id, day, cost_usd), (key_id, month, cost_usd)])

    def spent(self, key_id: str) -> tuple[float, float]:
        day, month = _periods(datetime.now(UTC))
        with self.file.reading() as db:
            found = dict(db.execute("SELECT period, usd FROM spend WHERE key_id = ? AND period IN (?, ?)",
                                    (key_id, day, month)).fetchall())
        return found.get(day, 0.0), found.get(month, 0.0)

    def load(self, day: dict[str, float], month: dict[str, float], now: datetime) -> None:
        """Replace the spend with totals summed elsewhere (the capture store) for ``now``'s periods."""
        periods = _periods(now)
        with self.file.transaction() as db:
            db.execute("DELETE FROM spend")
            db.executemany("INSERT INTO spend VALUES (?, ?, ?)",
                           [(k, periods[0], usd) for k, usd in day.items()]
                           + [(k, periods[1], usd) for k, usd in month.items()])

    def close(self) -> None:
        self.file.close()


def shared_limits_in(folder: Path, data_dir: Path) -> Path:
    """Create the workers' shared limits in ``folder``, with this day's and month's spend summed
    from the capture store (nothing when there is no store yet), and name it in the environment
    the workers inherit."""
    path = folder / SharedLimits.FILE
    limits = SharedLimits(path)
    try:
        if (data_dir / SCHEMA_FILE).exists():
            now = datetime.now(UTC)
            try:
                limits.load(*spend_from_store(data_dir, now), now)
            except StoreError as exc:
                log.warning("spend budgets start from zero: the capture store could not be read (%s)", exc)
    finally:
        limits.close()
    os.environ[SHARED_LIMITS_ENV] = str(path)
    return path


class Quotas:
    """Admits or refuses requests by their key's limits, and keeps the spend."""

    def __init__(self, data_dir: Path, shared: Path | None = None) -> None:
        """``shared``: the workers' SQLite file (``shared_limits_in``), which then holds the
        spend already; None keeps this process's limits in memory."""
        self.data_dir = data_dir
        self.shared = shared is not None
        self.limits: LocalLimits | SharedLimits = SharedLimits(shared) if shared else LocalLimits()

    def admit(self, key: KeyEntry) -> None:
        """Raise RateLimitError or BudgetExceededError (429) when the key may not start a call now."""
        if key.rpm:
            self._take_token(key)
        if key.budget_usd_day is None and key.budget_usd_month is None:
            return
        day, month = self.limits.spent(key.id)
        for spent, budget, period in ((day, key.budget_usd_day, "daily"), (month, key.budget_usd_month, "monthly")):
            if budget is not None and spent >= budget:
                raise BudgetExceededError(
                    f"This gateway key has used its {period} budget (${spent:.4f} of ${budget:.2f}).",
                    code="budget_exceeded", retry_after_s=_until_next(period))

    def spend(self, key_id: str, cost_usd: float | None) -> None:
        """Count what a finished call cost (unpriced calls count nothing)."""
        if not cost_usd:
            return
        try:
            self.limits.add(key_id, cost_usd)
        except StoreError as exc:  # the call is done: it is recorded, only the budget misses it
            log.error("the spend of key %s was not counted: %s", key_id, exc)

    def _take_token(self, key: KeyEntry) -> None:
        wait = self.limits.take(key.id, key.rpm, time.monotonic())
        if wait:
            raise RateLimitError(f"This gateway key is limited to {key.rpm} requests per minute; "
                                 f"retry in {wait:.1f} s.", code="rate_limit_exceeded", retry_after_s=wait)

    def restore(self) -> None:
        """Sum this UTC day's and month's spend per key from the capture store (shared limits
        have it already)."""
        if self.shared:
            return
        now = datetime.now(UTC)
        try:
            day, month = spend_from_store(self.data_dir, now)
        except StoreError as exc:
            log.warning("spend budgets start from zero: the capture store could not be read (%s)", exc)
            return
        self.limits.load(day, month, now)
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
