"""The Grafana dashboards of arbitrage, built with grafana-foundation-sdk.

    .venv/bin/python grafana/generate.py      # rewrites grafana/dashboards/*.json

Three dashboards: Savings; Routing and quality; Gateway health. Every query uses only metric names
that ``gateway/metrics.py`` defines, as prometheus_client exposes them (counters with ``_total``,
histograms with ``_bucket``); tests/test_dashboards.py runs each one against a real Prometheus
scraping a real gateway. Panels built with ``local=True`` (their titles are in
``LOCAL_ROUTE_PANELS``) show metrics that exist only once the local route serves traffic.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE_UID = "arbitrage-prometheus"
"""The uid the provisioned datasource has (grafana/provisioning/datasources/prometheus.yaml)."""
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
OUT = Path(__file__).parent / "dashboards"
LOCAL_ROUTE_PANELS: set[str] = set()
"""Titles of panels (and annotations) whose metrics exist only once the local route serves traffic."""
LOCAL_NOTE = " Empty until the local route serves traffic."

RAMP_ANNOTATION = "Ramp decisions"
RATE = "$__rate_interval"
PER_HOUR = "3600"


def query(expr: str, legend: str = "", instant: bool = False, fmt: PromQueryFormat | None = None) -> Dataquery:
    q = Dataquery().expr(expr).legend_format(legend or "__auto").datasource(DATASOURCE)
    if fmt:
        q = q.format(fmt)
    return q.instant() if instant else q.range()


def _common(panel, title: str, description: str, unit: str, width: int, height: int, local: bool,
            queries: tuple[Dataquery, ...]):
    if local:
        LOCAL_ROUTE_PANELS.add(title)
        description += LOCAL_NOTE
    panel = panel.title(title).description(description).unit(unit).span(width).height(height).datasource(DATASOURCE)
    for ref, q in zip("ABCDEFGH", queries):
        panel = panel.with_target(q.ref_id(ref))
    return panel


def series(title: str, description: str, unit: str, *queries: Dataquery, width: int = 12, height: int = 8,
           local: bool = False, stack: bool = False) -> timeseries.Panel:
    """A time series panel."""
    panel = timeseries.Panel().fill_opacity(10 if not stack else 60).line_width(1)
    if stack:
        from grafana_foundation_sdk.builders.common import StackingConfig
        from grafana_foundation_sdk.models.common import StackingMode

        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    return _common(panel, title, description, unit, width, height, local, queries)


def single(title: str, description: str, unit: str, *queries: Dataquery, width: int = 6, height: int = 5,
           local: bool = False) -> stat.Panel:
    """A stat panel (one number per series)."""
    return _common(stat.Panel(), title, description, unit, width, height, local, queries)


def ramp_annotation() -> db.AnnotationQuery:
    """Ramp controller decisions as annotations: one marker per (path, action) step up or down."""
    LOCAL_ROUTE_PANELS.add(RAMP_ANNOTATION)
    return (db.AnnotationQuery().name(RAMP_ANNOTATION).datasource(DATASOURCE).enable(True).icon_color("orange")
            .expr("sum by (path, action) (increase(arbitrage_ramp_decisions_total[$__interval])) > 0"))


def dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).description(description).tags(["arbitrage"]).refresh("30s")
            .time("now-6h", "now").timezone("browser").editable())


def savings() -> db.Dashboard:
    """Spend against counterfactual spend, dollars saved against the one-time cost, per-path savings and share."""
    return (
        dashboard("arbitrage-savings", "arbitrage / Savings",
                  "What the gateway spends, what the upstream alone would have cost, and what the local route saves. "
                  "Counters restart with the gateway: `arbitrage roi` computes breakeven from the capture store.")
        .annotation(ramp_annotation())
        .with_row(db.Row("Spend"))
        .with_panel(series(
            "Spend vs counterfactual spend", "Dollars per hour actually paid upstream, and what the upstream would "
            "have charged for every request (the gap is what the local route saves).", "currencyUSD",
            query(f"sum(rate(arbitrage_cost_usd_total[{RATE}])) * {PER_HOUR}", "spend $/h"),
            query(f"sum(rate(arbitrage_counterfactual_cost_usd_total[{RATE}])) * {PER_HOUR}", "counterfactual $/h")))
        .with_panel(series(
            "Spend by path", "Dollars per hour paid upstream, per call path.", "currencyUSD",
            query(f"sum by (path) (rate(arbitrage_cost_usd_total[{RATE}])) * {PER_HOUR}", "{{path}}")))
        .with_panel(single(
            "Spend in range", "Dollars paid upstream over the dashboard's time range.", "currencyUSD",
            query("sum(increase(arbitrage_cost_usd_total[$__range]))", "spend", instant=True)))
        .with_panel(single(
            "Counterfactual spend in range", "What the upstream would have charged over the time range.",
            "currencyUSD",
            query("sum(increase(arbitrage_counterfactual_cost_usd_total[$__range]))", "counterfactual", instant=True)))
        .with_panel(single(
            "Unpriced requests in range", "Requests to models with no known price: spend is a lower bound.",
            "short", query("sum(increase(arbitrage_unpriced_requests_total[$__range]))", "unpriced",
                           instant=True)))
        .with_panel(single(
            "Saved in range", "Counterfactual minus actual dollars of locally served requests.", "currencyUSD",
            query("sum(increase(arbitrage_saved_usd_total[$__range]))", "saved", instant=True), local=True))
        .with_row(db.Row("Savings and breakeven"))
        .with_panel(series(
            "Cumulative dollars saved vs one-time cost", "Dollars saved since each gateway started (summed over "
            "replicas) against the one-time cost of the serving adapters (teacher dollars + training compute): "
            "breakeven where the lines cross.", "currencyUSD",
            query("sum(arbitrage_saved_usd_total)", "saved"),
            query("sum(arbitrage_distill_cost_usd)", "one-time cost"), local=True))
        .with_panel(series(
            "Savings rate per path", "Dollars per hour saved by serving locally.", "currencyUSD",
            query(f"sum by (path) (rate(arbitrage_saved_usd_total[{RATE}])) * {PER_HOUR}", "{{path}}"), local=True))
        .with_panel(series(
            "Local share per path", "Share of each path's requests answered locally, and the configured share "
            "tried locally.", "percent",
            query(f"100 * sum by (path) (rate(arbitrage_requests_total{{served_by=\"local\"}}[{RATE}])) "
                  f"/ sum by (path) (rate(arbitrage_requests_total[{RATE}]))", "{{path}} served locally"),
            query("max by (path) (arbitrage_local_share_percent)", "{{path}} configured"), local=True))
        .with_panel(series(
            "Shadow and audit cost", "Dollars per hour spent on shadow and audit comparisons.", "currencyUSD",
            query(f"sum by (path, kind) (rate(arbitrage_shadow_cost_usd_total[{RATE}])) * {PER_HOUR}",
                  "{{path}} {{kind}}"), local=True))
        .with_panel(single(
            "One-time distillation cost", "Teacher dollars + training compute of each path's serving adapter.",
            "currencyUSD", query("max by (path) (arbitrage_distill_cost_usd)", "{{path}}", instant=True),
            width=24, local=True))
    )


def routing() -> db.Dashboard:
    """Who serves, why local answers fall back, agreement against target and floor, confidence, ramp."""
    return (
        dashboard("arbitrage-routing", "arbitrage / Routing and quality",
                  "How requests are routed between the upstream and the local model, and how well they agree.")
        .annotation(ramp_annotation())
        .with_panel(series(
            "Share by who served", "Requests per second by who answered: upstream, local, or fallback (tried "
            "locally, answered upstream), as a share of all requests.", "percent",
            query(f"100 * sum by (served_by) (rate(arbitrage_requests_total[{RATE}])) / ignoring(served_by) "
                  f"group_left sum(rate(arbitrage_requests_total[{RATE}]))", "{{served_by}}"), stack=True))
        .with_panel(series(
            "Fallback reasons", "Requests tried locally and answered upstream, per second, by reason.", "reqps",
            query(f"sum by (reason) (rate(arbitrage_fallbacks_total[{RATE}]))", "{{reason}}"), local=True))
        .with_panel(series(
            "Agreement with target and floor", "Agreement of recent shadow and audit comparisons, its Wilson lower "
            "bound (what the ramp uses), the target to raise the share and the floor that rolls it back.",
            "percentunit",
            query("max by (path) (arbitrage_agreement_ratio)", "{{path}} agreement"),
            query("max by (path) (arbitrage_agreement_lower_bound)", "{{path}} lower bound"),
            query("max by (path) (arbitrage_agreement_target)", "{{path}} target"),
            query("max by (path) (arbitrage_agreement_floor)", "{{path}} floor"), local=True))
        .with_panel(series(
            "Ramp evidence", "Comparisons the ramp counts under each path's policy in force: it starts afresh at "
            "every change of the policy and raises the share from ramp.min_samples on (arbitrage route show has "
            "what it waits for).", "none",
            query("max by (path) (arbitrage_ramp_samples)", "{{path}} comparisons"), local=True))
        .with_panel(series(
            "Shadow and audit comparisons", "Comparisons per second by kind and outcome, and the work dropped: "
            "queue_full when more arrive than [local] shadow_concurrency and shadow_queue allow, error when a "
            "comparison failed.", "ops",
            query(f"sum by (kind, agreed) (rate(arbitrage_shadow_comparisons_total[{RATE}]))",
                  "{{kind}} agreed={{agreed}}"),
            query(f"sum by (reason) (rate(arbitrage_shadow_dropped_total[{RATE}]))", "dropped: {{reason}}"),
            local=True))
        .with_panel(_common(
            heatmap.Panel(), "Confidence distribution", "Confidence of local answers (arbitrage_local_confidence).",
            "none", 12, 8, True,
            (query(f"sum by (le) (increase(arbitrage_local_confidence_bucket[{RATE}]))", "{{le}}",
                   fmt=PromQueryFormat.HEATMAP),)))
        .with_panel(single(
            "Routing mode per path", "The mode each path is in (off, shadow, canary, local).", "none",
            query("max by (path, mode) (arbitrage_route_mode) == 1", "{{path}}: {{mode}}", instant=True),
            width=12, height=8, local=True))
    )



def health() -> db.Dashboard:
    """Requests, latency, time to first token, errors, retries, capture backlog, local model server."""
    latency = "arbitrage_request_latency_seconds_bucket"
    ttft = "arbitrage_time_to_first_token_seconds_bucket"
    return (
        dashboard("arbitrage-health", "arbitrage / Gateway health", "Traffic, latency, errors and the capture store.")
        .with_panel(series(
            "Requests per second", "By endpoint and status class.", "reqps",
            query(f"sum by (endpoint, status_class) (rate(arbitrage_requests_total[{RATE}]))",
                  "{{endpoint}} {{status_class}}")))
        .with_panel(series(
            "Latency p50 / p99 by route", "Time from request to last byte, by who served.", "s",
            query(f"histogram_quantile(0.5, sum by (le, served_by) (rate({latency}[{RATE}])))", "p50 {{served_by}}"),
            query(f"histogram_quantile(0.99, sum by (le, served_by) (rate({latency}[{RATE}])))", "p99 {{served_by}}")))
        .with_panel(series(
            "Time to first token p50 / p99", "Streamed requests: time to the first token, by who served.", "s",
            query(f"histogram_quantile(0.5, sum by (le, served_by) (rate({ttft}[{RATE}])))", "p50 {{served_by}}"),
            query(f"histogram_quantile(0.99, sum by (le, served_by) (rate({ttft}[{RATE}])))", "p99 {{served_by}}")))
        .with_panel(series(
            "Errors by type", "Requests that ended in an error, per second.", "reqps",
            query(f"sum by (error_type) (rate(arbitrage_errors_total[{RATE}]))", "{{error_type}}")))
        .with_panel(series(
            "Upstream retries and 429s", "Upstream calls retried, per second, by upstream and reason (an HTTP "
            "status or a connection error), and the 429s among them.", "reqps",
            query(f"sum by (upstream, reason) (rate(arbitrage_upstream_retries_total[{RATE}]))",
                  "{{upstream}} {{reason}}"),
            query(f"sum(rate(arbitrage_upstream_retries_total{{reason=\"429\"}}[{RATE}]))", "429s")))
        .with_panel(series(
            "Capture backlog", "Journal bytes not yet compacted into Parquet (per gateway process).", "bytes",
            query("max(arbitrage_capture_backlog_bytes)", "bytes")))
        .with_panel(series(
            "Capture writes and failures", "Records written to the capture journal per second, and failures.",
            "ops",
            query(f"sum(rate(arbitrage_capture_records_total[{RATE}]))", "written"),
            query(f"sum(rate(arbitrage_capture_failures_total[{RATE}]))", "failed")))
        .with_panel(single(
            "Local model server up", "1 while the vLLM server answers its health check (min over gateways).",
            "bool", query("min(arbitrage_local_up)", "vLLM up", instant=True), width=12, height=8))
    )


DASHBOARDS = {"savings": savings, "routing": routing, "health": health}


def build() -> dict[str, dict]:
    """Every dashboard as the JSON Grafana loads (file name stem -> dashboard)."""
    encoder = JSONEncoder(sort_keys=True)
    return {name: _finish(json.loads(encoder.encode(make().build()))) for name, make in DASHBOARDS.items()}


def _finish(body: dict) -> dict:
    """Stable panel ids, empty rather than null options, and the Prometheus annotation fields the
    SDK's generic AnnotationQuery does not model."""
    for number, panel in enumerate(body["panels"], start=1):
        panel["id"] = number
        if panel.get("options") is None and panel["type"] != "row":
            panel["options"] = {}
    for annotation in body.get("annotations", {}).get("list", []):
        if annotation.get("name") == RAMP_ANNOTATION:
            annotation.update(titleFormat="ramp {{action}}", textFormat="{{path}}: {{action}}",
                              tagKeys="path,action", step="1m", useValueForTime=False)
    return body


def render(body: dict) -> str:
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def write(out: Path = OUT) -> list[Path]:
    """Write every dashboard (temporary name, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, body in build().items():
        target = out / f"{name}.json"
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temp.write_text(render(body))
        os.replace(temp, target)
        written.append(target)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path)
