"""``arbitrage roi`` on a store with known spend: hand-computed numbers, and what it says when data is missing.

The store (written through CaptureStore, manifests by hand), window 2026-03-01 .. 2026-03-31:

- ``intents``: 2 upstream calls ($1 each, 500k tokens each), 2 local calls ($0, counterfactual $1,
  500k tokens each), 1 fallback ($1, 500k tokens), first call 03-20, last 03-30 (10 days: monthly = x3),
  first local call 03-25. Shadow rows: one shadow comparison ($0, of upstream call u1) and one audit
  ($0.50). Datasets: $2.00 and $0.50 paid (the second also reused $2 of cached answers).
  Adapters: 3,600 s and 1,800 s of training.
- ``summaries``: 2 upstream calls of $0.40 over 2 days (monthly = x15), one dataset ($1), no adapter.
- ``fresh``: one call: no span, not projected.
- One $100 call of ``intents`` before the window.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from arbitrage.capture.store import CaptureStore, connect
from arbitrage.config import EconomicsSettings
from distill.roi import build_report, one_time_costs
from distill.roi_command import roi

SINCE = datetime(2026, 3, 1, tzinfo=UTC)
NOW = datetime(2026, 3, 31, tzinfo=UTC)
PER_MTOK = EconomicsSettings(training_usd_per_hour=2.0, serving_usd_per_mtok=0.1)


def day(d: int, hour: int = 0) -> datetime:
    return datetime(2026, 3, d, hour, tzinfo=UTC)


def call(request_id: str, path: str, ts: datetime, served_by: str, cost: float | None, counterfactual: float | None,
         tokens: tuple[int, int] = (250_000, 250_000)) -> dict:
    return {"request_id": request_id, "ts": ts.isoformat(), "path": path, "served_by": served_by,
            "status_code": 200, "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
            "cost_usd": cost, "counterfactual_cost_usd": counterfactual}


CALLS = [
    call("old", "intents", datetime(2026, 2, 1, tzinfo=UTC), "upstream", 100.0, 100.0),
    call("u1", "intents", day(20), "upstream", 1.0, 1.0),
    call("u2", "intents", day(22), "upstream", 1.0, 1.0),
    call("l1", "intents", day(25), "local", 0.0, 1.0, (300_000, 200_000)),
    call("l2", "intents", day(27), "local", 0.0, 1.0, (300_000, 200_000)),
    call("f1", "intents", day(30), "fallback", 1.0, 1.0, (400_000, 100_000)),
    call("s1", "summaries", day(28), "upstream", 0.4, 0.4),
    call("s2", "summaries", day(30), "upstream", 0.4, 0.4),
    call("n1", "fresh", day(29, 12), "upstream", 0.2, 0.2),
]
SHADOW = [
    {"shadow_id": "sh1", "ts": day(26).isoformat(), "request_id": "u1", "path": "intents", "kind": "shadow",
     "agreed": True, "cost_usd": 0.0},
    {"shadow_id": "sh2", "ts": day(27).isoformat(), "request_id": "l2", "path": "intents", "kind": "audit",
     "agreed": True, "cost_usd": 0.5},
]


def manifest(folder: Path, body: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(body))


def write_store(data_dir: Path, calls: list[dict], shadow: list[dict] = ()) -> Path:
    store = CaptureStore(data_dir)
    store.open()
    for record in calls:
        store.append("calls", record)
    for record in shadow:
        store.append("shadow", record)
    store.close()
    return data_dir


def dataset(data_dir: Path, path: str, version: int, spent: float, cached: float = 0.0) -> None:
    manifest(data_dir / "datasets" / path / f"v{version}",
             {"path": path, "dollars": {"spent_this_run_usd": spent, "cached_usd": cached}})


def adapter(data_dir: Path, path: str, version: int, wall_seconds: float) -> None:
    manifest(data_dir / "adapters" / path / f"v{version}",
             {"path": path, "timing": {"wall_seconds": wall_seconds, "train_seconds": wall_seconds * 0.9}})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    data_dir = write_store(tmp_path_factory.mktemp("roi") / "data", CALLS, SHADOW)
    dataset(data_dir, "intents", 1, 2.0)
    dataset(data_dir, "intents", 2, 0.5, cached=2.0)
    adapter(data_dir, "intents", 1, 3600)
    adapter(data_dir, "intents", 2, 1800)
    dataset(data_dir, "summaries", 1, 1.0)
    manifest(data_dir / "adapters" / "intents" / "v3.partial", {"path": "intents", "timing": {"wall_seconds": 9e9}})
    manifest(data_dir / "datasets" / "intents" / ".building-x" / "v1", {"path": "intents", "dollars": {}})
    return data_dir


def report(data_dir: Path, settings: EconomicsSettings = PER_MTOK):
    r = build_report(connect(data_dir), data_dir, settings, SINCE, NOW)
    return {p.path: p for p in r.paths}, r.total


def test_distilled_path_numbers(store):
    p = report(store)[0]["intents"]
    assert (p.calls, p.local_calls, p.span_days) == (5, 2, 10)
    assert p.one_time.teacher_usd == pytest.approx(2.5)   # the $2 of cached answers were paid once
    assert p.one_time.training_usd == pytest.approx(3.0)  # 1.5 h x $2
    assert p.before_usd == pytest.approx(15.0)            # $5 in 10 days x 3
    assert p.upstream_usd == pytest.approx(9.0)           # u1, u2, f1
    assert p.shadow_usd == pytest.approx(1.5)
    assert p.local_usd == pytest.approx(0.6)              # 2M tokens (l1, l2, f1, u1 shadowed) x $0.1 x 3
    assert (p.now_usd, p.savings_usd) == (pytest.approx(11.1), pytest.approx(3.9))


def test_breakeven_and_return(store):
    p = report(store)[0]["intents"]
    assert p.savings_start == day(25)
    assert p.breakeven == day(25) + timedelta(days=30 * 5.5 / 3.9)
    assert p.breakeven.date().isoformat() == "2026-05-06"
    assert p.return_12m_usd == pytest.approx(12 * 3.9 - 5.5)
    assert p.missing == []


def test_undistilled_and_unprojected_paths(store):
    paths = report(store)[0]
    assert paths["summaries"].before_usd == pytest.approx(12.0) == paths["summaries"].now_usd
    assert paths["summaries"].one_time.total_usd == pytest.approx(1.0)
    assert paths["summaries"].breakeven is None and "no adapter yet: no breakeven" in paths["summaries"].missing
    assert paths["fresh"].before_usd is None
    assert any("too short to project" in m for m in paths["fresh"].missing)


def test_total(store):
    total = report(store)[1]
    assert (total.before_usd, total.now_usd) == (pytest.approx(27.0), pytest.approx(23.1))
    assert total.one_time.total_usd == pytest.approx(6.5)
    assert total.breakeven == day(25) + timedelta(days=50)
    assert total.return_12m_usd == pytest.approx(12 * 3.9 - 6.5)
    assert any("fresh" in m for m in total.missing)


def test_always_on_server_is_charged_to_the_paths_that_use_it(store):
    p = report(store, EconomicsSettings(training_usd_per_hour=2.0, serving_usd_per_hour=0.01))[0]
    assert p["intents"].local_usd == pytest.approx(7.2)   # 720 h x $0.01, all of it: only intents calls locally
    assert p["summaries"].local_usd == 0
    assert p["intents"].savings_usd == pytest.approx(15 - 9 - 7.2 - 1.5)
    assert p["intents"].breakeven is None
    assert "savings are not positive at the window's rates: no breakeven" in p["intents"].missing


def test_missing_prices_are_named_not_guessed(store):
    p = report(store, EconomicsSettings())[0]["intents"]
    assert p.one_time.total_usd is None and p.now_usd is None and p.breakeven is None
    assert "training price not set ([economics] training_usd_per_hour)" in p.missing
    assert any(m.startswith("local serving price not set") for m in p.missing)


def test_adapter_without_local_traffic(tmp_path):
    data_dir = write_store(tmp_path / "data", [c for c in CALLS if c["served_by"] == "upstream"])
    adapter(data_dir, "intents", 1, 600)
    p = report(data_dir)[0]["intents"]
    assert p.local_usd == 0 and p.savings_usd == 0
    assert "no local traffic yet: no breakeven" in p.missing


def test_one_time_costs_for_the_gauge(store):
    assert one_time_costs(store, PER_MTOK) == {"intents": pytest.approx(5.5), "summaries": pytest.approx(1.0)}
    assert one_time_costs(store, EconomicsSettings()) == {"summaries": pytest.approx(1.0)}


def run(*args: str) -> str:
    result = CliRunner().invoke(roi, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_table_states_window_missing_data_and_assumptions(store):
    out = run("--data-dir", str(store), "--since", "2026-03-01", "--training-usd-per-hour", "2",
              "--serving-usd-per-mtok", "0.1")
    assert "ROI since 2026-03-01 00:00 UTC" in out
    line = next(l for l in out.splitlines() if l.startswith("intents"))
    assert line.split() == ["intents", "5", "2", "$5.50", "$15.00", "$11.10", "$3.90", "2026-05-06", "$41.30"]
    assert "summaries: no adapter yet: no breakeven" in out
    assert "$0.1 per million prompt + completion tokens" in out


def test_cli_json_and_config_prices(store, tmp_path):
    config = tmp_path / "arbitrage.toml"
    config.write_text("[economics]\ntraining_usd_per_hour = 2\nserving_usd_per_hour = 5\n")
    body = json.loads(run("--data-dir", str(store), "--config", str(config), "--since", "2026-03-01",
                          "--serving-usd-per-mtok", "0.1", "--json"))  # the flag replaces the hourly price
    intents = next(p for p in body["paths"] if p["path"] == "intents")
    assert intents["one_time"]["total_usd"] == pytest.approx(5.5)
    assert intents["savings_usd"] == pytest.approx(3.9)
    assert body["since"] == "2026-03-01T00:00:00+00:00" and len(body["assumptions"]) == 5


def test_cli_rejects_both_serving_prices(store, tmp_path):
    config = tmp_path / "arbitrage.toml"
    config.write_text("[economics]\nserving_usd_per_hour = 5\nserving_usd_per_mtok = 1\n")
    result = CliRunner().invoke(roi, ["--data-dir", str(store), "--config", str(config)])
    assert result.exit_code == 1
    assert "set serving_usd_per_hour or serving_usd_per_mtok, not both" in result.output


def test_chart(store, tmp_path):
    chart = tmp_path / "out" / "roi.png"
    run("--data-dir", str(store), "--since", "2026-03-01", "--training-usd-per-hour", "2",
        "--serving-usd-per-mtok", "0.1", "--chart", str(chart))
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in chart.parent.iterdir()] == ["roi.png"]


def test_no_chart_without_local_traffic(tmp_path):
    data_dir = write_store(tmp_path / "data", CALLS[:3])
    result = CliRunner().invoke(roi, ["--data-dir", str(data_dir), "--since", "2026-03-01", "--chart",
                                      str(tmp_path / "roi.png")])
    assert result.exit_code == 1 and "no chart" in result.output
    assert not (tmp_path / "roi.png").exists()


def test_empty_store(tmp_path):
    data_dir = write_store(tmp_path / "data", [])
    assert "no calls, datasets or adapters found" in run("--data-dir", str(data_dir))
