"""`arbitrage paths`: spend, projection and distillability per call path, over hand-written records."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from click.testing import CliRunner

from arbitrage.capture.migrations import migrate
from arbitrage.capture.store import CaptureStore, connect
from arbitrage.config import CaptureSettings
from distill.analytics import parse_since, path_stats, project_monthly
from distill.paths_command import format_dollars, paths

NOW = datetime.now(UTC).replace(microsecond=0)
CLASSIFY = "Classify the banking query into one of 77 intents. Answer JSON."
LABELS = ["card_arrival", "lost_card", "top_up", "refund"]
ERROR_BODY = '{"error": {"message": "slow down", "type": "rate_limit_error"}}'


def call(path: str, ts: datetime, answer: str, *, system: str = CLASSIFY, cost: float | None = 0.001,
         latency: float = 100.0, completion: int = 8, **fields) -> dict:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": "a question"}]}
    response = {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                                          "message": {"role": "assistant", "content": answer}}]}
    return {"request_id": uuid4().hex, "ts": ts, "path": path, "endpoint": "chat.completions",
            "model": "gpt-4o-mini", "status_code": 200, "prompt_tokens": 50, "completion_tokens": completion,
            "cost_usd": cost, "priced": cost is not None, "latency_ms": latency,
            "request": json.dumps(request), "response": json.dumps(response), **fields}


def tickets() -> list[dict]:
    """A JSON classifier: 200 examples over exactly 10 days, one 429, one empty answer, one call 40 days old."""
    first = NOW - timedelta(days=11)
    times = [first + timedelta(minutes=i) for i in range(199)] + [NOW - timedelta(days=1)]
    examples = [call("tickets", t, json.dumps({"intent": LABELS[i % 4]}), latency=100.0 if i % 2 == 0 else 300.0)
                for i, t in enumerate(times)]
    return examples + [
        call("tickets", first + timedelta(hours=5), "", status_code=429, error_type="rate_limited", cost=0.0,
             prompt_tokens=0, completion=0, latency=5.0, response=ERROR_BODY),
        call("tickets", first + timedelta(hours=6), "", cost=0.0, latency=200.0),
        call("tickets", NOW - timedelta(days=40), '{"intent": "refund"}'),
    ]


def chat() -> list[dict]:
    """Free-text chat: 5 long, distinct answers under 5 system prompts, over 2 hours."""
    return [call("chat", NOW - timedelta(hours=2) + timedelta(minutes=30 * i), f"Here is a long reply, number {i}.",
                 system=f"You are a helpful assistant, persona {i}.", cost=0.01, latency=1000.0 * (i + 1),
                 completion=300 + 100 * i) for i in range(5)]


def mystery() -> list[dict]:
    """A model without a known price: 2 of 3 calls unpriced, all within 20 minutes."""
    return [call("mystery", NOW - timedelta(hours=5) + timedelta(minutes=10 * i), '{"ok": true}',
                 cost=None if i < 2 else 0.003, completion=5, model="mycorp-unknown") for i in range(3)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("paths") / "data"
    store = CaptureStore(data_dir, CaptureSettings(fsync="never"))
    store.open()
    for record in tickets() + chat() + mystery():
        store.append("calls", record)
    store.close()
    return data_dir


def stats(data_dir, since=timedelta(days=30)) -> dict:
    return {s.path: s for s in path_stats(connect(data_dir), NOW - since)}


def invoke(*args: str):
    return CliRunner().invoke(paths, list(args))


# Analytics


def test_paths_are_ranked_by_spend(data_dir):
    assert [s.path for s in path_stats(connect(data_dir), NOW - timedelta(days=30))] == ["tickets", "chat", "mystery"]


def test_classification_path_numbers(data_dir):
    s = stats(data_dir)["tickets"]
    assert (s.calls, s.errors, s.examples, s.unpriced_calls, s.prompt_tokens) == (202, 1, 200, 0, 10_050)
    assert s.dollars == pytest.approx(0.2) and s.p50_latency_ms == 200.0
    assert (s.first_seen, s.last_seen) == (NOW - timedelta(days=11), NOW - timedelta(days=1))
    assert s.monthly_dollars == pytest.approx(0.6)  # $0.20 over 10 days, x 30
    assert s.projection == "dollars per day over the 10 days observed x 30"


def test_classification_path_is_distillable(data_dir):
    d = stats(data_dir)["tickets"].distillability
    assert (d.verdict, d.json_share, d.completion_tokens_p50, d.completion_tokens_p90) == ("distillable", 1.0, 8, 8)
    assert (d.templates, d.distinct_answers, d.answer_diversity) == (1, 4, 0.02)
    assert d.reasons == ("200 captured examples", "1 prompt template", "short answers (p90 8 completion tokens)",
                         "structured answers (100% JSON)")


def test_free_text_chat_path_is_not_yet(data_dir):
    s = stats(data_dir)["chat"]
    assert (s.calls, s.examples, s.p50_latency_ms, s.dollars) == (5, 5, 3000.0, pytest.approx(0.05))
    assert s.monthly_dollars == pytest.approx(18.0)  # $0.05 over 2 hours = $0.60 a day
    assert s.distillability.verdict == "not yet"
    assert s.distillability.reasons == (
        "needs at least 200 captured examples (has 5)", "5 system prompts (one task has at most 3)",
        "long answers (p90 660 completion tokens, more than 256)",
        "free-form answers (0% JSON, 5 distinct in 5 examples)")


def test_unpriced_calls_are_counted_never_free(data_dir):
    s = stats(data_dir)["mystery"]
    assert (s.calls, s.unpriced_calls, s.dollars, s.models) == (3, 2, 0.003, ("mycorp-unknown",))
    assert s.monthly_dollars is None and s.projection == "observed over 20 min, under 1 h: too short to project"
    assert s.distillability.verdict == "maybe"
    assert s.distillability.reasons[0] == "needs at least 200 captured examples (has 3)"


def test_window_filters_calls(data_dir):
    assert list(stats(data_dir, timedelta(hours=3))) == ["chat"]
    assert stats(data_dir, timedelta(days=60))["tickets"].calls == 203


def test_projection_rules():
    start = NOW - timedelta(hours=1)
    assert project_monthly(None, start, NOW) == (None, "no priced calls")
    assert project_monthly(1.0, start, NOW, unpriced=2) == (
        720.0, "dollars per day over the 1 h observed x 30; a lower bound (2 unpriced calls)")
    assert project_monthly(1.0, start + timedelta(seconds=1), NOW)[0] is None


def test_since_accepts_durations_and_iso_dates():
    assert parse_since("7d", now=NOW) == NOW - timedelta(days=7)
    assert parse_since("30m", now=NOW) == NOW - timedelta(minutes=30)
    assert parse_since("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("yesterday")


def test_dollar_formatting():
    assert [format_dollars(v) for v in (None, 0.0, 0.2, 18.0, 1234.5, 0.00001)] == [
        "-", "$0.00", "$0.2000", "$18.00", "$1,234.50", "$1.0e-05"]


# The command


def test_json_output(data_dir):
    body = json.loads(invoke("--data-dir", str(data_dir), "--json", "--limit", "2").stdout)
    assert [p["path"] for p in body["paths"]] == ["tickets", "chat"]
    assert body["paths"][0]["calls"] == 202 and body["paths"][0]["distillability"]["verdict"] == "distillable"
    assert body["paths"][1]["last_seen"] == NOW.isoformat()


def test_table_output(data_dir):
    result = invoke("--data-dir", str(data_dir), "--since", "3h")
    header, row = result.stdout.splitlines()[2:4]
    assert result.exit_code == 0 and header.split()[:3] == ["path", "model", "calls"]
    assert row.split() == ["chat", "gpt-4o-mini", "5", "0", "250", "2,500", "$0.0500", "0", "3,000", "$18.00", "5",
                           "not", "yet"]
    assert "chat: not yet: needs at least 200 captured examples (has 5);" in result.stdout


def test_table_explains_a_missing_projection(data_dir):
    result = invoke("--data-dir", str(data_dir), "--since", "2000-01-01")
    assert "mystery: maybe: needs at least 200" in result.stdout
    assert "no projection: observed over 20 min, under 1 h: too short to project" in result.stdout


def test_bad_since_is_a_usage_error(data_dir):
    result = invoke("--data-dir", str(data_dir), "--since", "last week")
    assert result.exit_code == 2 and "'last week' is neither a duration" in result.output


def test_empty_store(tmp_path):
    migrate(tmp_path)
    result = invoke("--data-dir", str(tmp_path))
    assert result.exit_code == 0 and result.stdout.startswith(f"no calls captured in {tmp_path} since ")


def test_not_a_store(tmp_path):
    result = invoke("--data-dir", str(tmp_path / "nothing"))
    assert result.exit_code == 1 and "not an arbitrage data directory" in result.output


def test_real_traffic_appears_as_a_path(gw):
    client = gw.client()
    for text in ["I am still waiting on my card?", "How do I top up?"] * 2 + ["My card is lost"]:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}],
                                       extra_headers={"X-Arbitrage-Path": "paths-test"})
    body = json.loads(invoke("--data-dir", str(gw.data_dir), "--json", "--limit", "1000").stdout)
    found = next(p for p in body["paths"] if p["path"] == "paths-test")
    assert (found["calls"], found["examples"], found["errors"]) == (5, 5, 0) and found["dollars"] > 0
