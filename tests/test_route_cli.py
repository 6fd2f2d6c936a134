"""``arbitrage route ...`` end to end against a real gateway process, and ``arbitrage local ...``
failure paths (no vLLM needed: an unreachable server, a missing or broken interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arbitrage.capture import migrations
from arbitrage.capture.location import PARQUET_DIR
from arbitrage.capture.store import CaptureStore
from arbitrage.route_command import render_ramp_evidence
from gateway import shadow_report
from gateway.shadow_report import request_input
from router.policy import RoutePolicy
from tests.conftest import banking77
from tests.processes import ARBITRAGE, arbitrage, free_port
from tests.test_admin_api import (
    AdminGateway,
    start_admin_gateway,
    write_adapter,
    write_eval,
)


def cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess:
    """Run ``arbitrage``; ``key`` goes in $ARBITRAGE_ADMIN_KEY (never on the command line)."""
    env = {k: v for k, v in os.environ.items() if k != "ARBITRAGE_ADMIN_KEY"}
    if key:
        env["ARBITRAGE_ADMIN_KEY"] = key
    return subprocess.run(ARBITRAGE + list(args), capture_output=True, text=True, env=env, timeout=120, check=False)


def failure(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def admin(sim, tmp_path_factory) -> AdminGateway:
    running = start_admin_gateway(tmp_path_factory.mktemp("route-cli"), sim.url)
    yield running
    running.stop()


def route(admin: AdminGateway, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    return cli("route", *args, "--url", admin.url, key=key or admin.admin_key)


# route show / set / promote / rollback


def test_show_prints_a_table_of_the_policies(admin):
    result = route(admin, "show")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["path", "mode", "share", "threshold", "adapter", "comparator", "history", "ramp",
                              "evidence", "calibrated", "(shadow", "data)"]
    row = next(r.split() for r in rows if r.startswith("support/intents"))
    assert ["support/intents", "canary", "10%", "0.8", "v1", "exact"] == row[:6]
    assert row[7:9] == ["none", "yet"], "no comparisons yet: the ramp has no evidence"
    assert row[9:] == ["not", "yet", "(0", "compared)"], "no shadow comparisons yet: no calibrated threshold"


def test_the_ramp_evidence_column_says_what_the_ramp_waits_for():
    ramp = RoutePolicy(mode="canary", adapter="v1", share=5).to_dict()
    off = RoutePolicy(mode="canary", adapter="v1", share=5, ramp={"enabled": False}).to_dict()

    def cell(reason: str | None, policy: dict = ramp) -> str:
        evidence = {"n": 40, "agreed": 39, "lower": 0.8714, "ramp": reason}
        return render_ramp_evidence(policy, {"evidence": evidence} if reason else {})

    assert cell("too_few_samples") == "39/40, lower 0.871 (needs 200)"
    assert cell("within_bounds") == "39/40, lower 0.871 (target 0.99)"
    assert cell("at_top") == "39/40, lower 0.871 (top step)"
    assert cell("below_floor") == "39/40, lower 0.871 (under floor 0.95)"
    assert cell(None) == "none yet" and cell("within_bounds", off) == "ramp off"


def test_show_json_of_one_path(admin):
    shown = json.loads(route(admin, "show", "faq", "--json").stdout)
    assert shown["faq"]["policy"]["mode"] == "off"


def test_set_changes_only_the_given_fields(admin):
    result = route(admin, "set", "cli/set", "--mode", "canary", "--adapter", "v2", "--share", "5",
                   "--comparator", "json", "--no-ramp", "--reason", "first canary")
    assert result.stdout.strip() == "cli/set: canary, share 5%, threshold 0, adapter v2, comparator json"
    route(admin, "set", "cli/set", "--threshold", "0.7", "--shadow-rate", "0.3")
    policy = json.loads(route(admin, "show", "cli/set", "--json").stdout)["cli/set"]["policy"]
    assert (policy["share"], policy["threshold"], policy["shadow_rate"], policy["ramp"]["enabled"]) == (5, 0.7, 0.3, False)


def test_set_with_a_bad_value_is_one_clear_line(admin):
    line = failure(route(admin, "set", "cli/bad", "--mode", "canary", "--share", "5"))
    assert line == "Error: routes.\"cli/bad\": mode 'canary' needs an adapter (set `adapter`, e.g. \"v1\")"
    assert "unknown comparator 'fuzzy'" in failure(route(admin, "set", "cli/bad", "--comparator", "fuzzy"))


def test_set_without_changes_is_a_usage_error(admin):
    result = route(admin, "set", "faq")
    assert result.returncode == 2 and "nothing to change" in result.stderr


def test_promote_and_rollback(admin):
    write_adapter(admin.data_dir, "cli/promo", "v1")
    write_eval(admin.data_dir, "cli/promo", "v1", 1, calibrated=0.66, at_target=0.5)
    route(admin, "set", "cli/promo", "--mode", "canary", "--adapter", "v1", "--share", "20")
    promoted = route(admin, "promote", "cli/promo", "--adapter", "v1")
    assert promoted.stdout.strip() == "cli/promo: shadow, share 0%, threshold 0.66, adapter v1, comparator exact"
    restored = route(admin, "rollback", "cli/promo", "--reason", "not yet")
    assert restored.stdout.strip() == "cli/promo: canary, share 20%, threshold 0, adapter v1, comparator exact"


def test_promote_of_a_missing_adapter_names_it(admin):
    line = failure(route(admin, "promote", "faq", "--adapter", "v9"))
    assert line.startswith("Error: path 'faq' has no adapter v9: ") and "arbitrage distill train faq" in line


def write_shadow(data_dir: Path, rows: list[tuple[str, str, float | None, bool | None]]) -> None:
    """Shadow comparisons (request_id, adapter, confidence, agreed) as a compacted Parquet file of the
    store: the comparisons themselves need a vLLM (tests/test_local_route.py)."""
    schema = migrations.table_schema("shadow")
    now = datetime.now(UTC)
    records = [{"shadow_id": f"s{i}", "ts": now + timedelta(seconds=i), "request_id": request_id,
                "path": "cli/disagree", "adapter": adapter, "kind": "shadow", "comparator": "exact",
                "upstream_answer": f"teacher {i}", "local_answer": f"student {i}", "confidence": confidence,
                "agreed": agreed, "cost_usd": 0.0, "latency_ms": 5.0, "error": None if agreed is not None else "timeout"}
               for i, (request_id, adapter, confidence, agreed) in enumerate(rows)]
    folder = data_dir / "shadow" / PARQUET_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), folder / "test-shadow.parquet")


@pytest.fixture(scope="module")
def compared(admin) -> tuple[list[str], list[str]]:
    """Two real calls of path cli/disagree through the gateway, and six comparisons of them (s0-s5):
    three disagreements of adapter v1 (0.91, 0.97, and 0.95 of a request never recorded), one
    agreement, one without a comparison, one of another adapter. Returns (texts, request ids)."""
    app = openai.OpenAI(base_url=admin.url + "/v1", api_key=admin.client_key, max_retries=0, timeout=30)
    texts = banking77("card_arrival")[:2]
    ids = [app.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", extra_headers={"X-Arbitrage-Path": "cli/disagree"},
        messages=[{"role": "system", "content": "Name the intent."}, {"role": "user", "content": text}],
    ).headers["x-arbitrage-request-id"] for text in texts]
    write_shadow(admin.data_dir, [
        (ids[0], "cli/disagree/v1", 0.91, False),
        (ids[1], "cli/disagree/v1", 0.97, False),
        ("never-recorded", "cli/disagree/v1", 0.95, False),
        (ids[0], "cli/disagree/v1", 0.999, True),     # agreed: not a disagreement
        (ids[1], "cli/disagree/v1", None, None),      # no comparison (a local timeout)
        (ids[1], "cli/disagree/v0", 0.998, False),    # another adapter's
    ])
    route(admin, "set", "cli/disagree", "--mode", "shadow", "--adapter", "v1")
    return texts, ids


def test_show_lists_a_paths_most_confident_disagreements_with_their_inputs(admin, compared):
    texts, ids = compared
    shown = json.loads(route(admin, "show", "cli/disagree", "--disagreements", "2", "--json").stdout)
    found = shown["cli/disagree"]["status"]["disagreements"]
    assert found["total"] == 3
    assert [(r["confidence"], r["request_id"], r["input"], r["upstream_answer"], r["local_answer"])
            for r in found["shown"]] == [(0.97, ids[1], texts[1], "teacher 1", "student 1"),
                                         (0.95, "never-recorded", None, "teacher 2", "student 2")]

    table = route(admin, "show", "cli/disagree", "--disagreements", "5").stdout
    heading, rows = table.split("\n\n")[1].split("\n", 1)
    assert heading == ("cli/disagree: the 3 most confident of 3 disagreements (adapter v1), most confident first "
                       "(arbitrage route review cli/disagree COMPARISON --verdict ...):")
    lines = rows.splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [["0.9700", "s1"], ["0.9500", "s2"], ["0.9100", "s0"]]
    assert texts[0][:20] in lines[2] and lines[1].split()[-2:] == ["-", "-"], "an unrecorded request has no input"


def test_review_records_a_verdict_that_the_disagreements_show(admin, compared):
    reviewed = route(admin, "review", "cli/disagree", "s1", "--verdict", "ambiguous", "--note", "fits both")
    assert reviewed.stdout.startswith("cli/disagree: comparison s1 reviewed ambiguous; calibrated threshold now")
    route(admin, "review", "cli/disagree", "s1", "--verdict", "upstream_wrong")  # the latest verdict counts
    shown = json.loads(route(admin, "show", "cli/disagree", "--disagreements", "2", "--json").stdout)["cli/disagree"]
    assert [(r["shadow_id"], r["verdict"]) for r in shown["status"]["disagreements"]["shown"]] == [
        ("s1", "upstream_wrong"), ("s2", None)]
    assert shown["status"]["calibration"]["reviewed_upstream_wrong"] == 1
    assert "(4 compared, 1 upstream wrong)" in route(admin, "show", "cli/disagree").stdout
    [row] = json.loads(arbitrage("sql", "SELECT * FROM reviews WHERE note = 'fits both'", "--json", "--data-dir",
                                 str(admin.data_dir)).stdout)
    assert (row["shadow_id"], row["adapter"], row["verdict"], row["reviewer"]) == ("s1", "cli/disagree/v1",
                                                                                   "ambiguous", "ops")


def test_a_review_of_an_unknown_comparison_or_with_a_bad_verdict_is_refused(admin):
    route(admin, "set", "cli/unreviewed", "--mode", "shadow", "--adapter", "v1")
    line = failure(route(admin, "review", "cli/unreviewed", "nope", "--verdict", "local_wrong"))
    assert line.startswith("Error: path 'cli/unreviewed' has no comparison 'nope'")
    assert "has no policy" in failure(route(admin, "review", "cli/none", "s1", "--verdict", "local_wrong"))
    assert route(admin, "review", "cli/unreviewed", "s1", "--verdict", "fine").returncode == 2
    refused = admin.call("POST", "/cli/unreviewed/review", json={"shadow_id": "s1", "verdict": "fine"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "verdict"
    assert admin.call("POST", "/cli/unreviewed/review", key="client",
                      json={"shadow_id": "s1", "verdict": "ambiguous"}).status_code == 403


def test_a_review_when_the_store_cannot_be_read_says_so_and_records_nothing(admin, compared):
    def reviews() -> int:
        return len(json.loads(arbitrage("sql", "SELECT * FROM reviews", "--json", "--data-dir",
                                        str(admin.data_dir)).stdout))

    before = reviews()
    broken = admin.data_dir / "shadow" / PARQUET_DIR / "broken.parquet"
    broken.write_bytes(b"PAR1 not a parquet file PAR1")
    try:
        line = failure(route(admin, "review", "cli/disagree", "s3", "--verdict", "ambiguous"))
    finally:
        broken.unlink()
    assert line.startswith("Error: the verdict was not recorded: the capture store in "), line
    assert "broken.parquet" in line and "Traceback" not in line
    assert reviews() == before
    assert route(admin, "review", "cli/disagree", "s3", "--verdict", "ambiguous").returncode == 0, "readable again"
    assert reviews() == before + 1


def test_review_takes_a_file_of_verdicts_checked_before_any_is_sent(admin, compared, tmp_path):
    verdicts = tmp_path / "verdicts.csv"
    verdicts.write_text("comparison,verdict,note\ns2,ambiguous,fits both\ns0,bogus,\n")
    bad = route(admin, "review", "cli/disagree", "--file", str(verdicts))
    assert bad.returncode == 2 and "line 3: a comparison id and a verdict of" in bad.stderr
    verdicts.write_text("comparison,verdict,note\ns2,ambiguous,fits both\ns0,local_wrong,\n")
    recorded = route(admin, "review", "cli/disagree", "--file", str(verdicts))
    assert recorded.stdout.startswith("cli/disagree: 2 verdicts recorded; calibrated threshold now")
    rows = json.loads(arbitrage("sql", "SELECT shadow_id, verdict, note FROM reviews WHERE shadow_id IN ('s0', 's2') "
                                "ORDER BY shadow_id", "--json", "--data-dir", str(admin.data_dir)).stdout)
    assert [(r["shadow_id"], r["verdict"], r["note"]) for r in rows] == [("s0", "local_wrong", None),
                                                                        ("s2", "ambiguous", "fits both")]
    verdicts.write_text("comparison,verdict\ns2,ambiguous\nnope,ambiguous\n")
    line = failure(route(admin, "review", "cli/disagree", "--file", str(verdicts)))
    assert line.startswith("Error: 1 of 2 verdicts recorded; then nope: path 'cli/disagree' has no comparison")
    assert route(admin, "review", "cli/disagree", "s1", "--file", str(verdicts)).returncode == 2
    assert route(admin, "review", "cli/disagree", "s1").returncode == 2, "a verdict is needed"


def test_a_comparison_reviewed_upstream_wrong_counts_as_agreed_in_the_calibration(tmp_path):
    store = CaptureStore(tmp_path)
    store.open()
    rows = [("top", 0.99, False)] + [(f"a{i}", 0.5 + i / 250, True) for i in range(100)]
    for shadow_id, confidence, agreed in rows:
        store.append("shadow", {"shadow_id": shadow_id, "ts": datetime.now(UTC), "path": "p", "adapter": "p/v1",
                                "kind": "shadow", "confidence": confidence, "agreed": agreed})
    policy = RoutePolicy.from_dict({"mode": "shadow", "adapter": "v1", "ramp": {"target": 0.95, "min_samples": 50}})
    before = shadow_report.calibration(tmp_path, "p", "p/v1", policy)
    assert (before["threshold"], before["reviewed_upstream_wrong"]) == (None, 0), "100 of 101: lower bound 0.946"
    store.append("reviews", {"review_id": "r", "ts": datetime.now(UTC), "shadow_id": "top", "path": "p",
                             "adapter": "p/v1", "verdict": "upstream_wrong"})
    after = shadow_report.calibration(tmp_path, "p", "p/v1", policy)
    assert (after["threshold"], after["reviewed_upstream_wrong"], after["samples"]) == (0.5, 1, 101)
    store.close()


def test_the_input_of_a_recorded_request():
    chat = {"messages": [{"role": "system", "content": "Name the intent."}, {"role": "user", "content": "Card?"}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Card?"}]}]}
    assert request_input(json.dumps(chat)) == "Card?"
    assert json.loads(request_input(json.dumps(parts))) == [{"type": "text", "text": "Card?"}]
    assert request_input(json.dumps({"prompt": "Card?"})) == "Card?"
    for unreadable in (None, "", "{not json", "[1, 2]", json.dumps({"messages": []})):
        assert request_input(unreadable) is None


def test_show_disagreements_needs_a_path_a_sane_count_and_says_when_there_are_none(admin):
    assert "--disagreements needs a PATH" in route(admin, "show", "--disagreements", "3").stderr
    assert route(admin, "show", "faq", "--disagreements", "0").returncode == 2
    refused = admin.call("GET", "/faq", params={"disagreements": "500"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "disagreements"
    assert route(admin, "show", "faq", "--disagreements", "3").stdout.endswith(
        "faq: no adapter, so no comparisons (arbitrage route promote faq --adapter V)\n")
    route(admin, "set", "cli/quiet", "--mode", "shadow", "--adapter", "v1")
    assert route(admin, "show", "cli/quiet", "--disagreements", "3").stdout.endswith(
        "cli/quiet: no disagreements among the shadow and audit comparisons of adapter v1\n")


# Reaching the gateway


def test_the_url_defaults_to_the_configs_gateway(admin, tmp_path):
    config = tmp_path / "arbitrage.toml"
    config.write_text(f"[gateway]\nport = {admin.process.port}\n")
    result = cli("route", "show", "--json", "--config", str(config), key=admin.admin_key)
    assert "support/intents" in json.loads(result.stdout)


def test_no_gateway_is_one_clear_line():
    line = failure(cli("route", "show", "--url", f"http://127.0.0.1:{free_port()}", key="sk-anything"))
    assert line.startswith("Error: no gateway answers at http://127.0.0.1:") and "arbitrage serve" in line


def test_missing_wrong_and_client_keys_are_clear(admin):
    assert "give --admin-key or set $ARBITRAGE_ADMIN_KEY" in failure(cli("route", "show", "--url", admin.url))
    assert "the gateway refused the key: Incorrect gateway key" in failure(route(admin, "show", key="sk-arb-nope"))
    line = failure(route(admin, "show", key=admin.client_key))
    assert "'admin' role" in line and "arbitrage keys create NAME --admin" in line


def test_the_admin_key_never_shows(admin):
    for args in (("show",), ("set", "faq", "--share", "500"), ("show", "--json")):
        result = route(admin, *args)
        assert admin.admin_key not in result.stdout + result.stderr


# local up / down / status


def local_config(tmp_path: Path, body: str) -> str:
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    config = tmp_path / "arbitrage.toml"
    config.write_text(f'[local]\nbase = "{base}"\nport = {free_port()}\nstartup_timeout_s = 30\n{body}')
    return str(config)


def test_local_status_of_an_unreachable_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    line = failure(cli("local", "status", "--url", url, "--data-dir", str(tmp_path)))
    assert line == f"Error: no healthy local model server at {url}: start one with `arbitrage local up`"


def test_local_up_with_a_missing_python(tmp_path):
    config = local_config(tmp_path, 'python = "/nonexistent/bin/python"\n')
    line = failure(cli("local", "up", "--config", config, "--data-dir", str(tmp_path / "data")))
    assert line.startswith("Error: no Python interpreter at '/nonexistent/bin/python' to run vLLM")


def test_local_up_with_a_python_that_cannot_run_vllm(tmp_path):
    config = local_config(tmp_path, 'python = "/bin/false"\n')
    result = cli("local", "up", "--config", config, "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1 and "Error: vLLM exited during startup (status 1)" in result.stderr
    assert not (tmp_path / "data" / "local" / "vllm.pid").exists()


def test_local_up_and_down_refuse_a_server_run_by_someone_else(tmp_path):
    config = local_config(tmp_path, 'url = "http://10.0.0.9:8000/v1"\n')
    assert "does not start it" in failure(cli("local", "up", "--config", config))
    assert "does not stop it" in failure(cli("local", "down", "--config", config))


def test_local_down_with_nothing_running(tmp_path):
    result = cli("local", "down", "--data-dir", str(tmp_path))
    assert result.returncode == 0 and "no local model server is running" in result.stdout


def test_local_up_status_down_with_a_real_vllm(tmp_path):
    """The one real start (about a minute of CPU): detached, healthy, a route's missing adapter
    reported while the server keeps running, status from another process, then down."""
    config = tmp_path / "arbitrage.toml"
    config.write_text(f'[local]\nport = {free_port()}\nmax_loras = 2\nmax_lora_rank = 16\nstartup_timeout_s = 300\n'
                      '[routes."real/path"]\nmode = "shadow"\nadapter = "v1"\n')
    args = ("--config", str(config), "--data-dir", str(tmp_path / "data"))
    try:
        up = cli("local", "up", *args)
        assert up.returncode == 1 and "vLLM is up (pid" in up.stderr, up.stderr
        assert "these adapters did not load: real/path/v1: no adapter folder" in up.stderr
        status = json.loads(cli("local", "status", "--json", *args).stdout)
        assert (status["healthy"], status["models"], status["missing"]) == (True, ["base"], ["real/path/v1"])
    finally:
        down = cli("local", "down", *args)
    assert down.returncode == 0 and down.stdout.startswith("stopped vLLM (pid"), down.stderr
