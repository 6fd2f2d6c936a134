"""The money of one demo run, measured: what ``arbitrage roi`` cannot say about a few minutes.

``arbitrage roi`` projects a month only from an hour or more of traffic, so for a demo run it
reports the one-time cost and says the window is too short. This report stays inside the run:

- **Spent** = upstream dollars paid (fallbacks included) + shadow and audit calls + the local
  server's uptime x its hourly price. **Before** = the counterfactual upstream cost of every call.
  **Saved** = before - spent.
- **Operating point** = the calls after the route's last change (its final share): local share,
  upstream dollars saved per request (local serving left out: it is a fixed hourly price).
- **Agreement** = shadow and audit comparisons of the run, with the Wilson interval.
- **Breakeven**: the request rate at which the always-on server pays for itself, and the date
  the one-time cost (teacher dollars + training time x price) is paid back at the stated volume.

The chart (``roi.png`` in the run folder): cumulative dollars before and spent over the run,
and the local share with the route's changes marked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arbitrage.demo import Demo

CALLS_SQL = """
SELECT ts, served_by,
       coalesce(counterfactual_cost_usd, cost_usd, 0) AS before_usd,
       CASE WHEN coalesce(served_by, 'upstream') <> 'local' THEN coalesce(cost_usd, 0) ELSE 0 END AS paid_usd
FROM calls WHERE path = $path ORDER BY ts
"""
SHADOW_SQL = """
SELECT ts, kind, agreed, coalesce(cost_usd, 0) AS cost_usd FROM shadow
WHERE path = $path AND error IS NULL ORDER BY ts
"""
CHANGES_SQL = "SELECT ts, actor, action, mode_after, share_after FROM route_changes WHERE path = $path ORDER BY ts"
GRAFANA = """Grafana (grafana/dashboards, provisioned by deploy/compose.yaml with Prometheus scraping {metrics}):
  Savings               arbitrage_saved_usd_total, arbitrage_cost_usd_total against
                        arbitrage_counterfactual_cost_usd_total, local share per path
  Routing and quality   arbitrage_local_share_percent, arbitrage_agreement_ratio with target and floor,
                        arbitrage_fallbacks_total, arbitrage_ramp_decisions_total (annotations)
  Gateway health        requests/s, latency p50/p99 by who served, capture backlog, arbitrage_local_up"""


@dataclass
class RunReport:
    """The text shown at the end of the demo and the numbers it is made of."""

    text: str
    facts: dict[str, Any]


def run_report(demo: Demo) -> RunReport:
    """Measure the run's money from its capture store and manifests; write ``roi.png``."""
    from arbitrage.capture.store import connect
    from arbitrage.demo import PATH

    with contextlib.closing(connect(demo.data_dir)) as con:
        calls = _rows(con, CALLS_SQL, PATH)
        shadow = _rows(con, SHADOW_SQL, PATH)
        changes = _rows(con, CHANGES_SQL, PATH)
    serving_start = demo.results["steps"].get("serve", {}).get("started_at")
    facts = measure(calls, shadow, changes, demo, serving_start)
    chart = demo.run_dir / "roi.png"
    if calls:
        write_chart(calls, shadow, changes, facts, chart)
        facts["chart"] = str(chart)
    return RunReport(render(facts, demo), facts)


def _rows(con, sql: str, path: str) -> list[dict[str, Any]]:
    relation = con.execute(sql, {"path": path})
    names = [d[0] for d in relation.description]
    return [dict(zip(names, row)) for row in relation.fetchall()]


def measure(calls: list[dict], shadow: list[dict], changes: list[dict], demo: Demo,
            serving_start: str | None) -> dict[str, Any]:
    """Every number of the report (dollars of the run, not projections, unless named so)."""
    from arbitrage.config import EconomicsSettings
    from distill.roi import read_one_time
    from router.stats import wilson

    econ = demo.economics
    now = datetime.now(UTC)
    serving_hours = ((now - datetime.fromisoformat(serving_start)) / timedelta(hours=1)) if serving_start else 0.0
    one_time = read_one_time(demo.data_dir, EconomicsSettings(
        training_usd_per_hour=econ.training_usd_per_hour)).get(_path(), None)
    before = sum(c["before_usd"] for c in calls)
    paid = sum(c["paid_usd"] for c in calls)
    shadow_usd = sum(s["cost_usd"] for s in shadow)
    serving_usd = serving_hours * econ.serving_usd_per_hour
    agreed = sum(bool(s["agreed"]) for s in shadow)
    lower, upper = wilson(agreed, len(shadow))
    facts = {
        "calls": len(calls), "served_locally": sum(c["served_by"] == "local" for c in calls),
        "fallbacks": sum(c["served_by"] == "fallback" for c in calls),
        "before_usd": before, "paid_upstream_usd": paid, "shadow_usd": shadow_usd, "serving_usd": serving_usd,
        "spent_usd": paid + shadow_usd + serving_usd, "saved_usd": before - paid - shadow_usd - serving_usd,
        "comparisons": len(shadow), "agreement": agreed / len(shadow) if shadow else None,
        "agreement_interval": [lower, upper] if shadow else None,
        "one_time_usd": one_time.total_usd if one_time else 0.0,
        "teacher_usd": one_time.teacher_usd if one_time else 0.0,
        "training_seconds": one_time.training_seconds if one_time else 0.0,
        "serving_started_at": serving_start, "serving_usd_per_hour": econ.serving_usd_per_hour,
        "route_changes": [{**c, "ts": c["ts"].isoformat()} for c in changes],
    }
    facts["operating_point"] = operating_point(calls, shadow, changes)
    facts["breakeven"] = breakeven(facts, econ)
    return facts


def _path() -> str:
    from arbitrage.demo import PATH

    return PATH


def operating_point(calls: list[dict], shadow: list[dict], changes: list[dict]) -> dict[str, Any] | None:
    """The calls since the route's last change: its share in practice and the upstream dollars it
    saves per request (shadow and audit calls included, local serving not)."""
    if not changes:
        return None
    since = changes[-1]["ts"]
    window = [c for c in calls if c["ts"] >= since]
    if not window:
        return None
    audits = sum(s["cost_usd"] for s in shadow if s["ts"] >= since)
    saved = sum(c["before_usd"] - c["paid_usd"] for c in window) - audits
    return {"since": since.isoformat(), "mode": changes[-1]["mode_after"], "share": changes[-1]["share_after"],
            "requests": len(window), "local_share": sum(c["served_by"] == "local" for c in window) / len(window),
            "before_per_request_usd": sum(c["before_usd"] for c in window) / len(window),
            "saved_per_request_usd": saved / len(window)}


def breakeven(facts: dict[str, Any], econ) -> dict[str, Any] | None:
    """When the server pays for itself (requests/hour) and when the one-time cost is paid back at
    ``econ.volume_per_day`` (None when the operating point saves nothing)."""
    point = facts["operating_point"]
    if not point or point["saved_per_request_usd"] <= 0:
        return None
    per_request = point["saved_per_request_usd"]
    daily = econ.volume_per_day * per_request - 24 * econ.serving_usd_per_hour
    result = {"server_pays_off_at_requests_per_hour": econ.serving_usd_per_hour / per_request,
              "volume_per_day": econ.volume_per_day, "saved_per_day_usd": daily, "saved_per_month_usd": daily * 30}
    if daily > 0:
        days = facts["one_time_usd"] / daily
        result.update(days=days, date=(datetime.now(UTC) + timedelta(days=days)).date().isoformat())
    return result


def render(facts: dict[str, Any], demo: Demo) -> str:
    """The end of the demo, in words and dollars."""
    lines = [(f"This run, measured ({facts['calls']} requests on the path, "
             f"{facts['served_locally']} served locally, {facts['fallbacks']} fell back upstream):"),
             f"  before (every request at {_model()} prices)  ${facts['before_usd']:.4f}",
             (f"  spent                                     ${facts['spent_usd']:.4f}  = upstream "
             f"${facts['paid_upstream_usd']:.4f} + shadow/audit ${facts['shadow_usd']:.4f} + local server "
             f"${facts['serving_usd']:.4f}"),
             f"  saved                                     ${facts['saved_usd']:.4f}",
             (f"  one-time cost                             ${facts['one_time_usd']:.4f}  = teacher "
             f"${facts['teacher_usd']:.4f} + {facts['training_seconds']:.0f} s of training")]
    lines += _agreement_lines(facts) + _operating_lines(facts) + _breakeven_lines(facts, demo)
    metrics = f"{demo.gateway.url}/metrics" if demo.gateway else "the gateway's /metrics"
    lines += ["", f"Chart: {facts.get('chart', 'none (no calls)')}", "", GRAFANA.format(metrics=metrics)]
    return "\n".join(lines)


def _model() -> str:
    from arbitrage.demo import MODEL

    return MODEL


def _agreement_lines(facts: dict[str, Any]) -> list[str]:
    if not facts["comparisons"]:
        return ["  agreement: no shadow or audit comparisons in this run"]
    low, high = facts["agreement_interval"]
    return [(f"  agreement with the frontier model         {facts['agreement']:.1%} of {facts['comparisons']} "
            f"shadow/audit comparisons (95% interval {low:.1%}-{high:.1%})")]


def _operating_lines(facts: dict[str, Any]) -> list[str]:
    point = facts["operating_point"]
    if not point:
        return ["  operating point: the route never changed in this run"]
    return [(f"  at the final route ({point['mode']} {point['share']:g}%, last {point['requests']} requests): "
            f"{point['local_share']:.0%} served locally, ${point['saved_per_request_usd'] * 1000:.4f} saved per "
            f"1,000 requests of ${point['before_per_request_usd'] * 1000:.4f}")]


def _breakeven_lines(facts: dict[str, Any], demo: Demo) -> list[str]:
    even = facts["breakeven"]
    if even is None:
        return ["  breakeven: none (the final route saves nothing per request)"]
    lines = [(f"  the local server (${demo.economics.serving_usd_per_hour:g}/hour) pays for itself above "
             f"{even['server_pays_off_at_requests_per_hour']:,.0f} requests/hour on this path")]
    if "days" in even:
        lines.append(f"  at {even['volume_per_day']:,} requests/day: ${even['saved_per_month_usd']:,.2f} saved a "
                     f"month; the one-time cost is paid back in {_duration(even['days'])} ({even['date']})")
    else:
        lines.append(f"  at {even['volume_per_day']:,} requests/day the server costs more than it saves")
    return lines


def _duration(days: float) -> str:
    if days < 1:
        return f"{days * 24:.1f} hours"
    return f"{days:.1f} days"


def write_chart(calls: list[dict], shadow: list[dict], changes: list[dict], facts: dict[str, Any],
                target: Path) -> None:
    """Cumulative dollars before and spent (top), local share with the route's changes (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    start = calls[0]["ts"]
    minutes = [(c["ts"] - start) / timedelta(minutes=1) for c in calls]
    fig, (money, share) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, layout="constrained",
                                       height_ratios=(3, 2))
    money.plot(minutes, _cumulative(c["before_usd"] for c in calls), label="before: every request upstream")
    money.plot(minutes, _spent_curve(calls, shadow, facts), label="spent: upstream + shadow/audit + local server")
    money.set(ylabel="dollars (cumulative)", title=f"This run: ${facts['saved_usd']:.4f} saved on "
              f"{facts['calls']} requests, {facts['served_locally']} served locally")
    money.legend(loc="upper left")
    share.plot(minutes, _rolling_local(calls), color="tab:green", label="served locally (last 50 requests)")
    for change in changes:
        at = (change["ts"] - start) / timedelta(minutes=1)
        share.axvline(at, color="grey", linestyle=":", linewidth=1)
        share.annotate(f"{change['action']}: {change['mode_after']} {change['share_after'] or 0:g}%", (at, 0.02),
                       rotation=90, fontsize=7, va="bottom")
    share.set(xlabel="minutes since the first request", ylabel="local share", ylim=(0, 1.05))
    share.legend(loc="upper left")
    for ax in (money, share):
        ax.grid(alpha=0.3)
    fig.savefig(target, dpi=100)
    plt.close(fig)


def _cumulative(values) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def _spent_curve(calls: list[dict], shadow: list[dict], facts: dict[str, Any]) -> list[float]:
    """Upstream paid + shadow/audit cost + the server's hourly cost accrued, up to each call."""
    started = facts["serving_started_at"] and datetime.fromisoformat(facts["serving_started_at"])
    per_hour = facts["serving_usd_per_hour"]
    shadow_usd, i, paid, out = 0.0, 0, 0.0, []
    for call in calls:
        while i < len(shadow) and shadow[i]["ts"] <= call["ts"]:
            shadow_usd += shadow[i]["cost_usd"]
            i += 1
        paid += call["paid_usd"]
        serving = per_hour * max(0.0, (call["ts"] - started) / timedelta(hours=1)) if started else 0.0
        out.append(paid + shadow_usd + serving)
    return out


def _rolling_local(calls: list[dict], window: int = 50) -> list[float]:
    flags = [c["served_by"] == "local" for c in calls]
    return [sum(flags[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(flags))]
