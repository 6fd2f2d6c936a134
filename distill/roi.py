"""Return on distillation, per call path and in total, from captured data and manifests only.

- **One-time cost** = teacher dollars paid by every dataset build of the path (each manifest's
  ``dollars.spent_this_run_usd``: answers reused from the cache were paid once, by an earlier
  build) + the wall time of every training run of the path (adapter manifests,
  ``timing.wall_seconds``) x ``training_usd_per_hour``.
- **Monthly spend before** = the counterfactual upstream cost of every call in the window.
- **Monthly spend now** = upstream dollars paid (calls answered upstream, fallbacks included)
  + local serving + the dollars of shadow and audit comparisons (the ``shadow`` table).
  Local serving is either an always-on machine (``serving_usd_per_hour`` x 720 hours, split
  between paths by their share of local model calls: served locally, fallen back, shadowed) or
  ``serving_usd_per_mtok`` x the prompt and completion tokens of the calls tried locally.
- Window dollars become monthly ones as in ``arbitrage paths``: dollars / the path's observed
  span (first to last call in the window) x 30 days; a span under an hour is not projected.
- **Breakeven**: savings accrue at the window's monthly rate from the path's first locally served
  call; the date the accrued savings reach the one-time cost. **12-month return** = 12 x monthly
  savings - one-time cost.

Where a number needs data that is not there (no adapter, no local traffic, a price not set), it
is None and ``missing`` says what is missing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arbitrage.config import EconomicsSettings
from distill.analytics import DAYS_PER_MONTH, MIN_PROJECTION_SPAN, project_monthly
from distill.versions import MANIFEST

if TYPE_CHECKING:
    import duckdb

HOURS_PER_MONTH = 24 * DAYS_PER_MONTH
RETURN_MONTHS = 12
_VERSION_DIR = re.compile(r"v\d+")


@dataclass
class OneTimeCost:
    """What distilling one path has cost so far."""

    datasets: int = 0
    adapters: int = 0
    teacher_usd: float = 0.0
    training_seconds: float = 0.0
    training_usd: float | None = 0.0
    """None when there are adapters but no training price."""
    missing: list[str] = field(default_factory=list)

    @property
    def total_usd(self) -> float | None:
        return None if self.training_usd is None else self.teacher_usd + self.training_usd


@dataclass
class PathROI:
    """The economics of one path (dollars per month unless named otherwise)."""

    path: str
    calls: int = 0
    local_calls: int = 0
    unpriced_calls: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    span_days: float | None = None
    one_time: OneTimeCost = field(default_factory=OneTimeCost)
    before_usd: float | None = None
    upstream_usd: float | None = None
    local_usd: float | None = None
    shadow_usd: float | None = None
    now_usd: float | None = None
    savings_usd: float | None = None
    savings_start: datetime | None = None
    """The path's first locally served call (ever), when savings began."""
    breakeven: datetime | None = None
    return_12m_usd: float | None = None
    missing: list[str] = field(default_factory=list)


@dataclass
class Report:
    """``arbitrage roi``: the window, the assumptions, each path and the total."""

    since: datetime
    now: datetime
    paths: list[PathROI]
    total: PathROI
    assumptions: list[str]


def one_time_costs(data_dir: Path, settings: EconomicsSettings) -> dict[str, float]:
    """One-time distillation cost per path (teacher dollars + training compute); paths whose
    cost is unknown (adapters but no training price) are left out."""
    costs = {path: cost.total_usd for path, cost in read_one_time(Path(data_dir), settings).items()}
    return {path: total for path, total in costs.items() if total is not None}


def read_one_time(data_dir: Path, settings: EconomicsSettings) -> dict[str, OneTimeCost]:
    """One-time cost of every path that has a dataset or an adapter."""
    costs: dict[str, OneTimeCost] = {}
    for manifest in _manifests(data_dir / "datasets"):
        _add_dataset(costs.setdefault(manifest["path"], OneTimeCost()), manifest)
    for manifest in _manifests(data_dir / "adapters"):
        _add_adapter(costs.setdefault(manifest["path"], OneTimeCost()), manifest, settings)
    return costs


def _manifests(root: Path) -> list[dict[str, Any]]:
    """Manifests of published versions (``.../vN/manifest.json``) below ``root``, with their path."""
    found = []
    for file in sorted(root.rglob(MANIFEST)) if root.is_dir() else ():
        relative = file.parent.relative_to(root)
        if _VERSION_DIR.fullmatch(file.parent.name) and not any(p.startswith(".") for p in relative.parts):
            manifest = _read_manifest(file)
            manifest.setdefault("path", str(relative.parent))
            manifest["_file"] = str(file)
            found.append(manifest)
    return found


def _read_manifest(file: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError):
        manifest = None
    return manifest if isinstance(manifest, dict) else {"_unreadable": True}


def _add_dataset(cost: OneTimeCost, manifest: dict[str, Any]) -> None:
    cost.datasets += 1
    spent = (manifest.get("dollars") or {}).get("spent_this_run_usd")
    if isinstance(spent, (int, float)):
        cost.teacher_usd += spent
    else:
        cost.missing.append(f"teacher dollars not recorded in {manifest['_file']}")


def _add_adapter(cost: OneTimeCost, manifest: dict[str, Any], settings: EconomicsSettings) -> None:
    cost.adapters += 1
    seconds = (manifest.get("timing") or {}).get("wall_seconds")
    if not isinstance(seconds, (int, float)):
        cost.missing.append(f"training time not recorded in {manifest['_file']}")
        cost.training_usd = None
        return
    cost.training_seconds += seconds
    if settings.training_usd_per_hour is None:
        if cost.training_usd is not None:
            cost.missing.append("training price not set ([economics] training_usd_per_hour)")
        cost.training_usd = None
    elif cost.training_usd is not None:
        cost.training_usd += seconds / 3600 * settings.training_usd_per_hour


_CALLS_SQL = """
SELECT path,
    count(*) AS calls,
    count(*) FILTER (served_by = 'local') AS local_calls,
    count(*) FILTER (served_by IN ('local', 'fallback')) AS local_model_calls,
    count(*) FILTER (cost_usd IS NULL) AS unpriced_calls,
    coalesce(sum(counterfactual_cost_usd), 0) AS before_usd,
    coalesce(sum(cost_usd) FILTER (coalesce(served_by, 'upstream') <> 'local'), 0) AS upstream_usd,
    coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))
             FILTER (served_by IN ('local', 'fallback')), 0) AS local_tokens,
    min(ts) AS first_seen,
    max(ts) AS last_seen
FROM calls WHERE ts >= $since AND ts <= $now GROUP BY path
"""

_SHADOW_SQL = """
SELECT s.path,
    count(*) FILTER (s.kind = 'shadow') AS local_model_calls,
    coalesce(sum(s.cost_usd), 0) AS shadow_usd,
    coalesce(sum(coalesce(c.prompt_tokens, 0) + coalesce(c.completion_tokens, 0))
             FILTER (s.kind = 'shadow'), 0) AS local_tokens
FROM shadow s LEFT JOIN calls c ON c.request_id = s.request_id
WHERE s.ts >= $since AND s.ts <= $now GROUP BY s.path
"""

_FIRST_LOCAL_SQL = "SELECT path, min(ts) FROM calls WHERE served_by = 'local' AND ts <= $now GROUP BY path"


@dataclass
class _Usage:
    """One path's raw window sums (window dollars, not monthly)."""

    calls: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None

    def get(self, name: str) -> float:
        return sum((part or {}).get(name) or 0 for part in (self.calls, self.shadow))


def build_report(con: duckdb.DuckDBPyConnection, data_dir: Path, settings: EconomicsSettings,
                 since: datetime, now: datetime | None = None) -> Report:
    """The ROI of every path with calls in the window or a dataset or adapter, and the total."""
    now = now or datetime.now(UTC)
    usage = _window_usage(con, since, now)
    one_time = read_one_time(Path(data_dir), settings)
    first_local = dict(con.execute(_FIRST_LOCAL_SQL, {"now": now}).fetchall())
    serving = _serving_shares(usage, settings)
    paths = [_path_roi(p, usage.get(p, _Usage()), one_time.get(p, OneTimeCost()), first_local.get(p),
                       serving.get(p), settings) for p in sorted(set(usage) | set(one_time))]
    paths.sort(key=lambda r: (-(r.savings_usd or 0), -(r.before_usd or 0), r.path))
    return Report(since, now, paths, total_roi(paths), assumptions(settings, serving))


def _window_usage(con: duckdb.DuckDBPyConnection, since: datetime, now: datetime) -> dict[str, _Usage]:
    usage: dict[str, _Usage] = {}
    for sql, part in ((_CALLS_SQL, "calls"), (_SHADOW_SQL, "shadow")):
        relation = con.execute(sql, {"since": since, "now": now})
        columns = [d[0] for d in relation.description]
        for row in relation.fetchall():
            setattr(usage.setdefault(row[0], _Usage()), part, dict(zip(columns, row)))
    return usage


def _serving_shares(usage: dict[str, _Usage], settings: EconomicsSettings) -> dict[str, float]:
    """Per path: its monthly local serving dollars, or window dollars with a per-token price."""
    if settings.serving_usd_per_mtok is not None:
        return {p: u.get("local_tokens") / 1e6 * settings.serving_usd_per_mtok for p, u in usage.items()}
    if settings.serving_usd_per_hour is None:
        return {}
    calls = {p: u.get("local_model_calls") for p, u in usage.items()}
    total = sum(calls.values())
    monthly = settings.serving_usd_per_hour * HOURS_PER_MONTH
    return {p: monthly * n / total for p, n in calls.items()} if total else {p: 0.0 for p in usage}


def _path_roi(path: str, usage: _Usage, one_time: OneTimeCost, first_local: datetime | None,
              serving: float | None, settings: EconomicsSettings) -> PathROI:
    calls = usage.calls or {}
    roi = PathROI(path, calls=calls.get("calls", 0), local_calls=calls.get("local_calls", 0),
                  unpriced_calls=calls.get("unpriced_calls", 0), first_seen=calls.get("first_seen"),
                  last_seen=calls.get("last_seen"), one_time=one_time, savings_start=first_local,
                  missing=list(one_time.missing))
    factor = _monthly_factor(roi)
    if factor is not None:
        _monthly(roi, usage, factor, serving, settings)
    _breakeven(roi)
    return roi


def _monthly_factor(roi: PathROI) -> float | None:
    """Window dollars x this = monthly dollars (as ``arbitrage paths`` projects); None, with the
    reason, when the window cannot be projected."""
    if not roi.calls:
        roi.missing.append("no calls in the window")
        return None
    roi.span_days = (roi.last_seen - roi.first_seen) / timedelta(days=1)
    factor, how = project_monthly(1.0, roi.first_seen, roi.last_seen, 0)
    if factor is None:
        roi.missing.append(f"calls {how}")
    return factor


def _monthly(roi: PathROI, usage: _Usage, factor: float, serving: float | None,
             settings: EconomicsSettings) -> None:
    roi.before_usd = usage.get("before_usd") * factor
    roi.upstream_usd = usage.get("upstream_usd") * factor
    roi.shadow_usd = usage.get("shadow_usd") * factor
    roi.local_usd = _local_usd(roi, usage, factor, serving, settings)
    if roi.local_usd is not None:
        roi.now_usd = roi.upstream_usd + roi.local_usd + roi.shadow_usd
        roi.savings_usd = roi.before_usd - roi.now_usd
    if roi.unpriced_calls:
        roi.missing.append(f"{roi.unpriced_calls} calls have no known price: spend is a lower bound")


def _local_usd(roi: PathROI, usage: _Usage, factor: float, serving: float | None,
               settings: EconomicsSettings) -> float | None:
    if serving is not None:
        return serving * factor if settings.serving_usd_per_mtok is not None else serving
    if usage.get("local_model_calls"):
        roi.missing.append("local serving price not set ([economics] serving_usd_per_hour or serving_usd_per_mtok)")
        return None
    return 0.0


def _breakeven(roi: PathROI) -> None:
    """Breakeven date and 12-month return, or what is missing for them."""
    reason = _no_breakeven(roi)
    if reason:
        roi.missing.append(reason)
        return
    cost, savings = roi.one_time.total_usd, roi.savings_usd
    roi.return_12m_usd = RETURN_MONTHS * savings - cost
    if savings <= 0:
        roi.missing.append("savings are not positive at the window's rates: no breakeven")
    else:
        roi.breakeven = roi.savings_start + timedelta(days=DAYS_PER_MONTH * cost / savings)


def _no_breakeven(roi: PathROI) -> str | None:
    if not roi.one_time.adapters:
        return "no adapter yet: no breakeven"
    if roi.savings_start is None:
        return "no local traffic yet: no breakeven"
    if roi.one_time.total_usd is None:
        return "one-time cost unknown: no breakeven"
    if roi.savings_usd is None:
        return "monthly savings unknown: no breakeven"
    return None


TOTAL = "(total)"


def total_roi(paths: list[PathROI]) -> PathROI:
    """The sum over paths; a sum is None when any path's part is unknown (named in ``missing``)."""
    total = PathROI(TOTAL, calls=sum(p.calls for p in paths), local_calls=sum(p.local_calls for p in paths),
                    unpriced_calls=sum(p.unpriced_calls for p in paths))
    total.one_time = OneTimeCost(datasets=sum(p.one_time.datasets for p in paths),
                                 adapters=sum(p.one_time.adapters for p in paths),
                                 teacher_usd=sum(p.one_time.teacher_usd for p in paths),
                                 training_seconds=sum(p.one_time.training_seconds for p in paths),
                                 training_usd=_sum(paths, lambda p: p.one_time.training_usd, total, "training cost"))
    projected = [p for p in paths if p.before_usd is not None]
    skipped = [p.path for p in paths if p.calls and p.before_usd is None]
    if skipped:
        total.missing.append(f"not projected, so not in the monthly sums: {', '.join(skipped)}")
    for name in ("before_usd", "upstream_usd", "local_usd", "shadow_usd", "now_usd", "savings_usd"):
        setattr(total, name, _sum(projected, lambda p, n=name: getattr(p, n), total, name) if projected else None)
    starts = [p.savings_start for p in paths if p.savings_start and p.one_time.adapters]
    total.savings_start = min(starts, default=None)
    _breakeven(total)
    return total


def _sum(paths: list[PathROI], value, total: PathROI, what: str) -> float | None:
    unknown = [p.path for p in paths if value(p) is None]
    if unknown:
        total.missing.append(f"{what} unknown for {', '.join(unknown)}")
        return None
    return sum(value(p) for p in paths)


def assumptions(settings: EconomicsSettings, serving: dict[str, float]) -> list[str]:
    """How the numbers were computed, printed with them."""
    training = (f"${settings.training_usd_per_hour:g}/hour" if settings.training_usd_per_hour is not None
                else "a training price that is not set")
    return [
        (f"monthly = dollars in the window / the path's observed span (first to last call) x {DAYS_PER_MONTH} "
         f"days; spans under {MIN_PROJECTION_SPAN / timedelta(hours=1):g} h are not projected; "
         f"a month is {DAYS_PER_MONTH} days"),
        ("spend before = the counterfactual upstream cost of every call; spend now = upstream dollars paid "
         "(fallbacks included) + local serving + shadow and audit calls"),
        _serving_assumption(settings, serving),
        ("one-time = teacher dollars of every dataset build (cached answers counted once) + wall time of every "
         f"training run x {training}"),
        (f"savings accrue at the window's monthly rate from the path's first locally served call; "
         f"{RETURN_MONTHS}-month return = {RETURN_MONTHS} x monthly savings - one-time cost"),
    ]


def _serving_assumption(settings: EconomicsSettings, serving: dict[str, float]) -> str:
    if settings.serving_usd_per_mtok is not None:
        return (f"local serving = ${settings.serving_usd_per_mtok:g} per million prompt + completion tokens of calls "
                f"tried locally (fallbacks and shadow calls counted at their upstream answer's tokens)")
    if settings.serving_usd_per_hour is None:
        return "local serving price not set: paths with local model calls have no spend now"
    line = (f"local serving = ${settings.serving_usd_per_hour:g}/hour, always on ({HOURS_PER_MONTH} h/month), "
            f"split by each path's share of local model calls (served, fallen back, shadowed)")
    return line if any(serving.values()) else line + "; no local model calls in the window, so not counted"
