"""The route table: TOML policies, live edits in routes.json shared by several processes, history and
rollback, change records; and a bad route policy stopping ``arbitrage serve`` with one line."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from arbitrage.capture.migrations import migrate, table_schema
from arbitrage.capture.store import CaptureStore, connect
from arbitrage.config import CaptureSettings, Config, GatewaySettings
from arbitrage.errors import ConfigError
from gateway.route_table import (
    HISTORY_LIMIT,
    ROUTES_FILE,
    RouteChange,
    RouteTable,
    merge_fields,
)
from router.policy import RoutePolicy
from tests.processes import arbitrage

ROUTES = {
    "support/intents": {"mode": "canary", "adapter": "v2", "share": 10, "threshold": 0.8},
    "faq": {"mode": "off"},
}
ROUTE_CHANGES_COLUMNS = ["change_id", "ts", "path", "actor", "action", "mode_before", "mode_after", "share_before",
                         "share_after", "threshold_before", "threshold_after", "reason", "evidence"]


def config(data_dir: Path, routes: dict | None = None) -> Config:
    return Config(gateway=GatewaySettings(data_dir=str(data_dir)), routes=ROUTES if routes is None else routes)


@pytest.fixture
def table(tmp_path) -> RouteTable:
    return RouteTable(config(tmp_path))


def shadow(adapter: str = "v3", **fields) -> RoutePolicy:
    return RoutePolicy(mode="shadow", adapter=adapter, **fields)


# Policies from the config and from routes.json


def test_policies_come_from_the_toml_config(table):
    assert table.get("support/intents") == RoutePolicy(mode="canary", adapter="v2", share=10, threshold=0.8)
    assert table.get("unknown") is None
    assert list(table.policies()) == ["faq", "support/intents"]


def test_an_edit_is_written_whole_and_survives_a_new_table(tmp_path, table):
    table.set("support/intents", shadow(), actor="admin", reason="test")
    assert RouteTable(config(tmp_path)).get("support/intents") == shadow()
    saved = json.loads((tmp_path / ROUTES_FILE).read_text())
    assert saved["routes"]["support/intents"]["policy"]["mode"] == "shadow"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_an_edit_overrides_the_toml_only_for_its_path(tmp_path, table):
    table.set("faq", shadow(), actor="admin", reason="test")
    again = RouteTable(config(tmp_path))
    assert again.get("faq") == shadow()
    assert again.get("support/intents").share == 10


def test_update_merges_fields_onto_the_current_policy(table):
    updated = table.update("support/intents", {"share": 25, "ramp": {"target": 0.98}}, actor="admin", reason="t")
    assert (updated.mode, updated.adapter, updated.share, updated.threshold) == ("canary", "v2", 25, 0.8)
    assert (updated.ramp.target, updated.ramp.floor) == (0.98, 0.95)


def test_update_of_a_new_path_starts_from_the_default_policy(table):
    created = table.update("new/path", {"mode": "shadow", "adapter": "v1"}, actor="admin", reason="t")
    assert created == RoutePolicy(mode="shadow", adapter="v1")
    assert table.history("new/path") == []


def test_a_mode_change_without_a_share_implies_one(table):
    assert table.update("support/intents", {"mode": "shadow"}, actor="admin", reason="t").share == 0
    assert table.update("support/intents", {"mode": "local"}, actor="admin", reason="t").share == 100
    assert table.update("support/intents", {"mode": "canary", "share": 5}, actor="admin", reason="t").share == 5


def test_merge_keeps_comparator_options_unless_the_comparator_changes():
    current = {"comparator": {"name": "json", "keys": ["intent"]}, "share": 0}
    assert merge_fields(current, {"comparator": {"keys": ["a"]}})["comparator"] == {"name": "json", "keys": ["a"]}
    assert merge_fields(current, {"comparator": {"name": "exact"}})["comparator"] == {"name": "exact"}


# Bad values


@pytest.mark.parametrize(("fields", "message"), [
    ({"share": 150}, 'routes."support/intents": share must be within 0-100'),
    ({"share": "ten"}, "Expected `float`, got `str` - at `$.share`"),
    ({"bogus": 1}, "unknown field `bogus`"),
    ({"mode": "shadow", "share": 5}, "share must be 0 in shadow mode"),
    ({"adapter": "support/intents/v3"}, 'adapter must be a version of this path\'s adapter like "v3"'),
    ({"ramp": {"target": 2}}, "ramp.target must be within (0, 1]"),
])
def test_bad_values_are_config_errors_naming_the_field(table, fields, message):
    with pytest.raises(ConfigError) as caught:
        table.update("support/intents", fields, actor="admin", reason="t")
    assert message in str(caught.value)
    assert table.get("support/intents").share == 10


def test_a_bad_path_name_is_refused(table):
    with pytest.raises(ConfigError, match="not a usable call path name"):
        table.set("../escape", shadow(), actor="admin", reason="t")
    with pytest.raises(ConfigError, match="not a usable call path name"):
        table.adapter_folder("/etc", "v1")


def test_a_damaged_routes_file_stops_a_new_table_and_is_ignored_by_refresh(tmp_path, table):
    table.set("faq", shadow(), actor="admin", reason="t")
    (tmp_path / ROUTES_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="routes.json is unreadable"):
        RouteTable(config(tmp_path))
    assert table.refresh() is False
    assert table.get("faq") == shadow()


# History and rollback


def test_rollback_restores_earlier_policies_newest_first(table):
    table.set("support/intents", shadow("v3"), actor="admin", reason="a")
    table.update("support/intents", {"threshold": 0.9}, actor="admin", reason="b")
    assert len(table.history("support/intents")) == 2
    assert table.rollback("support/intents", actor="admin") == shadow("v3")
    assert table.rollback("support/intents", actor="admin").mode == "canary"
    assert table.history("support/intents") == []


def test_rollback_without_history_goes_to_shadow_with_share_zero(table):
    restored = table.rollback("support/intents", actor="admin")
    assert (restored.mode, restored.share, restored.adapter, restored.threshold) == ("shadow", 0, "v2", 0.8)


def test_rollback_with_nothing_to_restore_is_a_config_error(table):
    with pytest.raises(ConfigError, match="'nowhere' has no policy to roll back"):
        table.rollback("nowhere", actor="admin")
    with pytest.raises(ConfigError, match="'faq' is off and has no earlier policy"):
        table.rollback("faq", actor="admin")


def test_history_keeps_the_last_policies_only(table):
    for share in range(1, HISTORY_LIMIT + 6):
        table.update("support/intents", {"share": share}, actor="ramp", reason="step")
    history = table.history("support/intents")
    assert len(history) == HISTORY_LIMIT
    assert history[-1]["policy"]["share"] == HISTORY_LIMIT + 4
    assert (history[-1]["actor"], history[-1]["action"], history[-1]["reason"]) == ("ramp", "update", "step")


# Several writers and readers


def test_refresh_sees_another_instances_edit(tmp_path, table):
    other = RouteTable(config(tmp_path))
    assert table.refresh() is False
    other.set("faq", shadow(), actor="admin", reason="t")
    assert table.refresh() is True
    assert table.get("faq") == shadow()
    assert table.refresh() is False


def test_an_edit_starts_from_the_latest_file_not_a_stale_copy(tmp_path, table):
    other = RouteTable(config(tmp_path))
    other.set("faq", shadow(), actor="admin", reason="t")
    table.update("support/intents", {"share": 20}, actor="admin", reason="t")
    assert RouteTable(config(tmp_path)).get("faq") == shadow()


def _updates(data_dir: str, path: str, count: int) -> None:
    table = RouteTable(config(Path(data_dir)))
    for share in range(1, count + 1):
        table.update(path, {"mode": "canary", "adapter": "v1", "share": share}, actor="admin", reason="race")


def test_concurrent_processes_lose_no_edit(tmp_path):
    paths = [f"race/{n}" for n in range(4)]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_updates, args=(str(tmp_path), p, 15)) for p in paths]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * len(paths)
    final = RouteTable(config(tmp_path))
    assert {p: (final.get(p).share, len(final.history(p))) for p in paths} == {p: (15, 14) for p in paths}


def test_concurrent_threads_on_one_path_lose_no_edit(tmp_path):
    threads = [threading.Thread(target=_updates, args=(str(tmp_path), "one", 5)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(RouteTable(config(tmp_path)).history("one")) == 4 * 5 - 1


# Adapters the local server must hold


def test_needed_adapters_are_those_of_policies_not_off(tmp_path, table):
    table.set("faq", RoutePolicy(mode="off", adapter="v7"), actor="admin", reason="t")
    table.set("other", shadow("v1"), actor="admin", reason="t")
    assert table.needed_adapters() == {"other/v1": tmp_path / "adapters" / "other" / "v1",
                                       "support/intents/v2": tmp_path / "adapters" / "support/intents" / "v2"}


# Change records


def test_on_change_gets_before_and_after(tmp_path):
    changes: list[RouteChange] = []
    table = RouteTable(config(tmp_path), on_change=changes.append)
    table.set("support/intents", shadow(), actor="ramp", reason="below_floor", evidence={"n": 50}, action="rollback")
    table.update("new", {"mode": "shadow", "adapter": "v1"}, actor="admin", reason="cli")
    first, second = (c.to_record() for c in changes)
    assert {k: first[k] for k in ("path", "actor", "action", "mode_before", "mode_after", "share_before",
                                  "share_after", "threshold_before", "reason", "evidence")} == {
        "path": "support/intents", "actor": "ramp", "action": "rollback", "mode_before": "canary",
        "mode_after": "shadow", "share_before": 10, "share_after": 0, "threshold_before": 0.8,
        "reason": "below_floor", "evidence": '{"n": 50}'}
    assert (second["mode_before"], second["share_before"], second["mode_after"]) == (None, None, "shadow")


def test_route_changes_table_has_exactly_the_record_columns(tmp_path):
    migrate(tmp_path)
    described = [c[0] for c in connect(tmp_path).execute("DESCRIBE route_changes").fetchall()]
    assert described == ROUTE_CHANGES_COLUMNS == table_schema("route_changes").names


def test_a_change_record_lands_in_the_store(tmp_path):
    store = CaptureStore(tmp_path, CaptureSettings(fsync="never"))
    store.open()
    RouteTable(config(tmp_path), on_change=lambda c: store.append("route_changes", c.to_record())).rollback(
        "support/intents", actor="admin")
    store.close()
    rows = connect(tmp_path).execute("SELECT path, action, mode_after, share_before FROM route_changes").fetchall()
    assert rows == [("support/intents", "rollback", "shadow", 10.0)]


# The config


def test_serve_with_a_bad_route_policy_stops_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[routes."support/intents"]\nmode = "canary"\nadapter = "v2"\nshare = 150\n')
    result = arbitrage("serve", "--config", str(bad), "--data-dir", str(tmp_path / "data"), "--dev", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'Error: {bad}: routes."support/intents": share must be within 0-100 (percent), got 150.0']


def test_a_change_conditional_on_a_revision_writes_nothing_once_the_policy_moved_on(tmp_path):
    changes = []
    table = RouteTable(config(tmp_path), on_change=changes.append)
    assert table.revision("support/intents") == "config" and table.revision("unknown") == ""
    first = table.revision("support/intents")
    table.update("support/intents", {"share": 20}, actor="admin", reason="test")
    second = table.revision("support/intents")
    assert second == changes[-1].change_id != first
    assert table.set("support/intents", shadow(), actor="ramp", reason="stale", revision=first) is None
    assert len(changes) == 1 and table.get("support/intents").share == 20
    assert RouteTable(config(tmp_path)).revision("support/intents") == second, "the revision is in routes.json"
    assert table.set("support/intents", shadow(), actor="ramp", reason="current", revision=second).mode == "shadow"
    assert table.revision("support/intents") == changes[-1].change_id != second
