"""Call-path analytics over the capture store: where the money goes, and what could be distilled.

One DuckDB query aggregates the ``calls`` view per path within a time window. Python only
projects the monthly spend and turns the path's signals into a verdict:

- **Projected monthly spend** = dollars of the priced calls / observed span x 30 days, where the
  span runs from the path's first to its last call inside the window. A span shorter than
  ``MIN_PROJECTION_SPAN`` is not projected (None, with the reason): a few minutes of traffic
  say nothing about a month. Unpriced calls make the projection a lower bound, and say so.
- **Verdict** from four checks (thresholds below): enough examples, one prompt template, short
  answers, structured answers (JSON, or few distinct answers). All pass: "distillable"; one
  fails: "maybe"; two or more fail: "not yet". Failed checks come first in the reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import duckdb

MIN_EXAMPLES = 200
"""Captured examples a path needs before distillation: enough to train on and to hold out an evaluation set."""
MAX_TEMPLATES = 3
"""Distinct system prompts a path may have and still be one task (a derived path has exactly one; a path
named by header or metadata may hold a few variants of its template)."""
MAX_P90_COMPLETION_TOKENS = 256
"""Short answers: the 90th percentile of the examples' completion tokens is at most this."""
MIN_JSON_SHARE = 0.9
"""Structured answers: at least this share of the answers is a JSON object or array ..."""
MAX_ANSWER_DIVERSITY = 0.2
"""... or distinct answers / examples is at most this (a classifier repeats a few labels)."""
MIN_PROJECTION_SPAN = timedelta(hours=1)
"""Paths observed over a shorter span get no monthly projection."""
DAYS_PER_MONTH = 30

Verdict = Literal["distillable", "maybe", "not yet"]

_DURATION = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class Distillability:
    """Whether a path looks worth distilling, and why."""

    verdict: Verdict
    reasons: tuple[str, ...]
    """One per check, failed checks first."""
    json_share: float | None
    """Share of the examples' answers that are a JSON object or array; None without examples."""
    completion_tokens_p50: float | None
    completion_tokens_p90: float | None
    templates: int
    """Distinct whitespace-normalized system prompts (no system prompt counts as one)."""
    distinct_answers: int
    answer_diversity: float | None
    """distinct_answers / examples; None without examples."""


@dataclass(frozen=True)
class PathStats:
    """One call path within the window."""

    path: str
    endpoints: tuple[str, ...]
    models: tuple[str, ...]
    """Requested models."""
    calls: int
    errors: int
    """Calls with an error type or an HTTP status of 400 or more."""
    prompt_tokens: int
    completion_tokens: int
    dollars: float | None
    """Sum of cost_usd over priced calls; None when no call was priced (never counted as free)."""
    unpriced_calls: int
    p50_latency_ms: float | None
    """Median latency of the successful calls."""
    first_seen: datetime
    last_seen: datetime
    monthly_dollars: float | None
    """Projected monthly spend; None when it cannot be projected (see ``projection``)."""
    projection: str
    """How monthly_dollars was computed, or why there is none."""
    examples: int
    """Successful calls (status 200, no error) with a non-empty answer: training material."""
    distillability: Distillability


_PATHS_SQL = r"""
WITH windowed AS (
    SELECT *,
        CASE WHEN json_valid(response) THEN coalesce(response ->> '$.choices[0].message.content',
                                                      response ->> '$.choices[0].text') END AS answer,
        regexp_replace(trim(coalesce(list_filter(
            CASE WHEN json_valid(request) THEN request -> '$.messages[*]' END,
            lambda m: m ->> 'role' IN ('system', 'developer'))[1] ->> 'content', '')), '\s+', ' ', 'g') AS template
    FROM calls WHERE ts >= $since
), marked AS (
    SELECT *, trim(answer) AS text,
        status_code = 200 AND error_type IS NULL AND coalesce(trim(answer), '') <> '' AS is_example
    FROM windowed
)
SELECT path,
    list_sort(list(DISTINCT endpoint) FILTER (endpoint IS NOT NULL)) AS endpoints,
    list_sort(list(DISTINCT model) FILTER (model IS NOT NULL)) AS models,
    count(*) AS calls,
    count(*) FILTER (error_type IS NOT NULL OR status_code >= 400) AS errors,
    coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    coalesce(sum(completion_tokens), 0) AS completion_tokens,
    sum(cost_usd) AS dollars,
    count(*) FILTER (cost_usd IS NULL) AS unpriced_calls,
    median(latency_ms) FILTER (error_type IS NULL AND status_code < 400) AS p50_latency_ms,
    min(ts) AS first_seen,
    max(ts) AS last_seen,
    count(*) FILTER (is_example) AS examples,
    avg(CASE WHEN json_valid(text) THEN json_type(text) IN ('OBJECT', 'ARRAY') ELSE false END::INT)
        FILTER (is_example) AS json_share,
    quantile_cont(completion_tokens::DOUBLE, 0.5) FILTER (is_example) AS completion_tokens_p50,
    quantile_cont(completion_tokens::DOUBLE, 0.9) FILTER (is_example) AS completion_tokens_p90,
    count(DISTINCT template) AS templates,
    count(DISTINCT text) FILTER (is_example) AS distinct_answers
FROM marked
GROUP BY path
ORDER BY dollars DESC NULLS LAST, calls DESC, path
LIMIT $limit
"""


def path_stats(con: duckdb.DuckDBPyConnection, since: datetime, limit: int | None = None) -> list[PathStats]:
    """Call paths with calls at or after ``since``, ranked by dollars (unpriced-only paths last)."""
    cursor = con.execute(_PATHS_SQL, {"since": since, "limit": limit})
    columns = [d[0] for d in cursor.description]
    return [_path_stats(dict(zip(columns, row))) for row in cursor.fetchall()]


def total_calls(con: duckdb.DuckDBPyConnection) -> int:
    """Every call in the store, whatever its time."""
    return con.execute("SELECT count(*) FROM calls").fetchone()[0]


def _path_stats(row: dict) -> PathStats:
    signals = {k: row.pop(k) for k in ("json_share", "completion_tokens_p50", "completion_tokens_p90",
                                       "templates", "distinct_answers")}
    monthly, projection = project_monthly(row["dollars"], row["first_seen"], row["last_seen"], row["unpriced_calls"])
    return PathStats(**{**row, "endpoints": tuple(row["endpoints"]), "models": tuple(row["models"])},
                     monthly_dollars=monthly, projection=projection,
                     distillability=assess(row["examples"], **signals))


def project_monthly(dollars: float | None, first: datetime, last: datetime, unpriced: int = 0
                    ) -> tuple[float | None, str]:
    """(projected monthly dollars or None, how it was computed or why not)."""
    span = last - first
    if dollars is None:
        return None, "no priced calls"
    if span < MIN_PROJECTION_SPAN:
        return None, f"observed over {_span_text(span)}, under {_span_text(MIN_PROJECTION_SPAN)}: too short to project"
    monthly = dollars / (span / timedelta(days=1)) * DAYS_PER_MONTH
    note = f"dollars per day over the {_span_text(span)} observed x {DAYS_PER_MONTH}"
    return monthly, note + (f"; a lower bound ({unpriced} unpriced calls)" if unpriced else "")


def _span_text(span: timedelta) -> str:
    hours = span / timedelta(hours=1)
    if hours < 1:
        return f"{span / timedelta(minutes=1):.0f} min"
    return f"{hours:.3g} h" if hours < 48 else f"{hours / 24:.3g} days"


def assess(examples: int, templates: int, json_share: float | None, completion_tokens_p50: float | None,
           completion_tokens_p90: float | None, distinct_answers: int) -> Distillability:
    """The verdict from four checks: 0 failed -> distillable, 1 -> maybe, more -> not yet."""
    diversity = distinct_answers / examples if examples else None
    checks = [
        (examples >= MIN_EXAMPLES, f"{examples} captured examples"
         if examples >= MIN_EXAMPLES else f"needs at least {MIN_EXAMPLES} captured examples (has {examples})"),
        (templates <= MAX_TEMPLATES, f"{templates} prompt template{'s' if templates > 1 else ''}"
         if templates <= MAX_TEMPLATES else f"{templates} system prompts (one task has at most {MAX_TEMPLATES})"),
        _short_check(completion_tokens_p90),
        _structure_check(json_share, diversity, distinct_answers, examples),
    ]
    failed = sum(not ok for ok, _ in checks)
    verdict: Verdict = "distillable" if failed == 0 else "maybe" if failed == 1 else "not yet"
    reasons = tuple(text for ok, text in sorted(checks, key=lambda c: c[0]))
    return Distillability(verdict, reasons, json_share, completion_tokens_p50, completion_tokens_p90,
                          templates, distinct_answers, diversity)


def _short_check(p90: float | None) -> tuple[bool, str]:
    if p90 is None:
        return False, "answer length unknown (no examples)"
    if p90 <= MAX_P90_COMPLETION_TOKENS:
        return True, f"short answers (p90 {p90:.0f} completion tokens)"
    return False, f"long answers (p90 {p90:.0f} completion tokens, more than {MAX_P90_COMPLETION_TOKENS})"


def _structure_check(json_share: float | None, diversity: float | None, distinct: int, examples: int
                     ) -> tuple[bool, str]:
    if json_share is None or diversity is None:
        return False, "answer structure unknown (no examples)"
    if json_share >= MIN_JSON_SHARE:
        return True, f"structured answers ({json_share:.0%} JSON)"
    if diversity <= MAX_ANSWER_DIVERSITY:
        return True, f"few distinct answers ({distinct} in {examples} examples)"
    return False, f"free-form answers ({json_share:.0%} JSON, {distinct} distinct in {examples} examples)"


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """The start of the window: ``now`` minus a duration (``30m``, ``24h``, ``7d``, ``2w``), or an ISO
    date or time (UTC unless it names a zone). Raises ValueError with a message for the user."""
    value = value.strip()
    if match := _DURATION.fullmatch(value):
        amount = int(match[1])
        if amount == 0:
            raise ValueError(f"{value!r}: the duration must be more than zero")
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[match[2]]: amount})
    try:
        start = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration (30m, 24h, 7d, 2w) nor an ISO date "
                         "(2024-05-01, 2024-05-01T12:00)") from None
    return start if start.tzinfo else start.replace(tzinfo=UTC)
