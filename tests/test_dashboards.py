"""Grafana dashboards: generated from grafana/generate.py, and every panel's query run against a real
Prometheus (the Debian package, started here on loopback) that scrapes the session's real gateway
every second while traffic flows through it (the official openai client, the simulator upstream).

Panels about the local route (``LOCAL_ROUTE_PANELS`` in grafana/generate.py) must return data once
the gateway reports locally served requests (or ``REQUIRE_LOCAL_ROUTE`` is set); every other query
must return data now.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway.metrics import Metrics
from tests.conftest import RoutedGateway, banking77, routed_gateway
from tests.processes import ServerProcess, free_port

ROOT = Path(__file__).parent.parent
GRAFANA = ROOT / "grafana"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5m", "$__range": "15m"}
"""What Grafana substitutes in the queries, at this test's scale (1 s scrapes, minutes of data)."""
LOCAL_TRAFFIC = 'sum(arbitrage_requests_total{served_by="local"}) > 0'
REQUIRE_LOCAL_ROUTE = True
"""Local-route panels must have data too: Prometheus also scrapes a routed gateway (the session's vLLM
serving a real adapter) through which local, shadow, audited and fallen-back traffic flows, and
whose ramp raises the share twice."""


def load_generator():
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = load_generator()
DASHBOARDS = GENERATE.build()


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel or annotation title, expr) of every query of every dashboard."""
    found = []
    for name, body in DASHBOARDS.items():
        for panel in body["panels"]:
            found += [(name, panel["title"], t["expr"]) for t in panel.get("targets", [])]
        found += [(name, a["name"], a["expr"]) for a in body.get("annotations", {}).get("list", [])]
    return found


QUERIES = panel_queries()


def exposed_names() -> set[str]:
    """Sample names the gateway's metrics expose, as prometheus_client writes them."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes[f.type]}


def test_committed_dashboards_are_the_generators_output():
    for name, body in DASHBOARDS.items():
        committed = (GRAFANA / "dashboards" / f"{name}.json").read_text()
        assert committed == GENERATE.render(body), f"grafana/dashboards/{name}.json is stale: run grafana/generate.py"


def test_queries_use_only_metrics_the_gateway_exposes():
    names = exposed_names()
    used = {n for _, _, expr in QUERIES for n in re.findall(r"\barbitrage_[a-z_]+", expr)}
    assert used and used <= names, f"unknown metric names: {sorted(used - names)}"


def test_every_local_route_mark_names_a_panel():
    titles = {title for _, title, _ in QUERIES}
    assert GENERATE.LOCAL_ROUTE_PANELS <= titles
    assert titles - GENERATE.LOCAL_ROUTE_PANELS  # some panels must have data now


def test_provisioned_datasource_is_the_one_panels_use():
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert [d["uid"] for d in source["datasources"]] == [GENERATE.DATASOURCE_UID]
    uids = {t["datasource"]["uid"] for body in DASHBOARDS.values() for p in body["panels"] for t in p.get("targets", [])}
    assert uids == {GENERATE.DATASOURCE_UID}


PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: arbitrage
    static_configs:
      - targets: ["{target}"]
  - job_name: arbitrage-routed
    static_configs:
      - targets: ["{routed}"]
"""


@pytest.fixture(scope="module")
def routed(sim, vllm, intents_adapter, tmp_path_factory) -> RoutedGateway:
    running = routed_gateway(tmp_path_factory.mktemp("dashboards-routed"), sim, vllm, intents_adapter)
    yield running
    running.process.stop()


@pytest.fixture(scope="module")
def prometheus(gw, routed, tmp_path_factory):
    """A real Prometheus on loopback scraping the session's gateway and a routed one every second."""
    if not shutil.which("prometheus"):
        pytest.fail("prometheus is not installed: run scripts/install (Debian package 'prometheus')")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.format(target=gw.process.url.removeprefix("http://"),
                                                     routed=routed.process.url.removeprefix("http://")))
    (tmp / "metrics-key").write_text(gw.metrics_key)  # /metrics takes a scrape-only key, as in deploy/
    config["scrape_configs"][0]["authorization"] = {"credentials_file": str(tmp / "metrics-key")}
    (tmp / "dev-key").write_text("dev")  # the routed gateway runs in dev mode (any key)
    config["scrape_configs"][1]["authorization"] = {"credentials_file": str(tmp / "dev-key")}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = ServerProcess(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], port, tmp / "prometheus.log", health="/-/ready")
    yield process.start(timeout=60)
    process.stop()


def send_traffic(gw) -> None:
    """Plain, streamed, failing (429 after retries) and unpriced requests through the official client."""
    client = gw.client(default_headers={"X-Arbitrage-Path": "dashboards"})
    messages = [{"role": "user", "content": "I lost my card, what do I do?"}]
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        for _chunk in client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True):
            pass
    client.chat.completions.create(model="mycorp-unpriced", messages=messages)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="error-429:gpt-4o-mini", messages=messages)


def send_local_traffic(routed: RoutedGateway) -> None:
    """Shadow comparisons that raise the share twice (50 %, then 100 %), audited local answers, and
    fallbacks on an unreachable threshold: every local-route metric gets data."""
    ramp = {"steps": [50.0, 100.0], "target": 0.4, "floor": 0.1, "min_samples": 3, "window": 50}
    routed.set_policy(mode="shadow", share=0.0, threshold=0.0, output="json", shadow_rate=1.0, audit_rate=1.0,
                      comparator={"name": "json"}, ramp=ramp)
    cards = iter(banking77("card_arrival"))  # the simulator's gold label is what the adapter answers
    for expected_share in (50.0, 100.0):
        deadline = time.monotonic() + 120
        while routed.route_status()["policy"]["share"] < expected_share:
            assert time.monotonic() < deadline, f"the ramp did not reach {expected_share}%: {routed.route_status()}"
            routed.ask(next(cards))
            time.sleep(1.0)  # background comparisons land; scrapes see each step
    for _ in range(3):
        assert routed.ask(next(cards)).headers["x-arbitrage-served-by"] == "local"
    routed.set_policy(mode="local", share=100.0, threshold=1.0, output="json", audit_rate=0.0)
    for _ in range(2):
        assert routed.ask(next(cards)).headers.get("x-arbitrage-served-by") is None  # fell back upstream


def instant(prometheus: ServerProcess, expr: str) -> dict:
    response = httpx.get(prometheus.url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def captured_records(gw) -> float:
    line = next(l for l in gw.metrics().splitlines() if l.startswith("arbitrage_capture_records_total "))
    return float(line.split()[1])


@pytest.fixture(scope="module")
def scraped(gw, routed, prometheus) -> ServerProcess:
    """Prometheus after it scraped the gateways a few times since the traffic was sent."""
    send_traffic(gw)
    send_local_traffic(routed)
    records = captured_records(gw)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        latest = instant(prometheus, "max(arbitrage_capture_records_total)")["result"]
        seen = instant(prometheus, "max(count_over_time(arbitrage_capture_records_total[1m]))")["result"]
        if latest and float(latest[0]["value"][1]) >= records and seen and float(seen[0]["value"][1]) >= 3:
            time.sleep(2)  # two more scrapes after the one that saw the traffic
            return prometheus
        time.sleep(0.5)
    pytest.fail(f"Prometheus did not scrape the traffic in 60 s:\n{prometheus.log.read_text()[-2000:]}")


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


@pytest.mark.parametrize("dashboard,title,expr", QUERIES, ids=[f"{d}/{t}/{i}" for i, (d, t, _) in enumerate(QUERIES)])
def test_query_returns_data_from_real_prometheus(scraped, dashboard, title, expr):
    data = instant(scraped, substitute(expr))  # a query that does not parse fails here (status "error")
    local_route_idle = not REQUIRE_LOCAL_ROUTE and not instant(scraped, LOCAL_TRAFFIC)["result"]
    if title in GENERATE.LOCAL_ROUTE_PANELS and local_route_idle:
        return  # the local route serves nothing yet: the query parsed, data will come with local traffic
    assert data["result"], f"{dashboard} / {title}: no data for {expr}"


def test_a_query_about_a_missing_metric_returns_no_data(scraped):
    """The check above can fail: a query on a name the gateway does not expose comes back empty."""
    assert instant(scraped, "sum(rate(arbitrage_requests_totals[1m]))")["result"] == []
    assert instant(scraped, "sum(rate(arbitrage_requests_total[1m]))")["result"]
