"""KeyStore: keys shown once, stored only as hashes, found, revoked, seen by other processes."""

from __future__ import annotations

import stat
import time

import pytest

from arbitrage.errors import ConfigError
from arbitrage.keys import KEYS_FILE, KeyLimits, KeyStore
from tests.processes import arbitrage


@pytest.fixture
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "data")


def test_created_key_has_the_gateway_prefix(store):
    entry, key = store.create("app-1")
    assert key.startswith("sk-arb-")
    assert len(key) > len("sk-arb-") + 40
    assert entry.name == "app-1"


def test_key_text_is_never_stored(store):
    _, key = store.create("app-1")
    raw = store.path.read_bytes()
    assert key.encode() not in raw
    assert key.removeprefix("sk-arb-").encode() not in raw


def test_lookup_finds_the_created_key(store):
    entry, key = store.create("app-1")
    assert store.lookup(key) == entry


def test_lookup_tells_keys_apart(store):
    first, key1 = store.create("app-1")
    second, key2 = store.create("app-2")
    assert (store.lookup(key1).id, store.lookup(key2).id) == (first.id, second.id)
    assert first.id != second.id


@pytest.mark.parametrize("wrong", ["sk-arb-wrong", "", "sk-arb-"])
def test_wrong_key_is_not_found(store, wrong):
    store.create("app-1")
    assert store.lookup(wrong) is None


def test_lookup_in_an_empty_store_finds_nothing(store):
    assert store.lookup("sk-arb-anything") is None


def test_duplicate_name_is_a_config_error(store):
    store.create("app-1")
    with pytest.raises(ConfigError, match="exists"):
        store.create("app-1")
    assert [e.name for e in store.entries()] == ["app-1"]


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "a/b", "x" * 65, "naïve"])
def test_bad_name_is_a_config_error(store, name):
    with pytest.raises(ConfigError, match="key name"):
        store.create(name)
    assert store.entries() == []


def test_revoke_makes_lookup_fail(store):
    _, key = store.create("app-1")
    store.lookup(key)
    store.revoke("app-1")
    assert store.lookup(key) is None


def test_revoke_keeps_the_other_keys(store):
    _, keep = store.create("keep")
    store.create("drop")
    store.revoke("drop")
    assert store.lookup(keep).name == "keep"


def test_revoking_an_unknown_name_is_a_config_error(store):
    with pytest.raises(ConfigError, match="no key named"):
        store.revoke("ghost")


def test_another_store_sees_a_new_key_at_once(store, tmp_path):
    _, key = store.create("app-1")
    assert KeyStore(tmp_path / "data").lookup(key) is not None


def test_another_store_sees_a_revocation_after_its_throttle(store, tmp_path):
    _, key = store.create("app-1")
    gateway = KeyStore(tmp_path / "data")
    assert gateway.lookup(key) is not None
    store.revoke("app-1")
    time.sleep(1.05)
    assert gateway.lookup(key) is None


def test_keys_file_is_private(store):
    store.create("app-1")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.path.name == KEYS_FILE


def test_entries_are_oldest_first(store):
    for name in ("b", "a", "c"):
        store.create(name)
    assert [e.name for e in store.entries()] == ["b", "a", "c"]


def test_unreadable_keys_file_is_a_config_error(store):
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        store.entries()


def test_name_with_a_trailing_newline_is_a_config_error(store):
    with pytest.raises(ConfigError):
        store.create("app\n")


def test_new_keys_are_clients_without_limits(store):
    entry, _ = store.create("app-1")
    assert (entry.role, entry.rpm, entry.budget_usd_day, entry.budget_usd_month) == ("client", None, None, None)


@pytest.mark.parametrize("role,may", [("client", {"client"}), ("metrics", {"metrics"}),
                                      ("admin", {"client", "metrics", "admin"})])
def test_roles(store, role, may):
    entry, _ = store.create("k", KeyLimits(role=role))
    assert {r for r in ("client", "metrics", "admin") if entry.has_role(r)} == may


def test_update_changes_limits_and_a_none_removes_one(store):
    store.create("app-1", KeyLimits(rpm=5, budget_usd_day=1.0))
    entry = store.update("app-1", rpm=None, budget_usd_month=20.0, role="admin")
    assert (entry.role, entry.rpm, entry.budget_usd_day, entry.budget_usd_month) == ("admin", None, 1.0, 20.0)
    assert store.entries() == [entry]


def test_update_is_seen_by_the_gateway_store(store, tmp_path):
    _, key = store.create("app-1")
    gateway = KeyStore(tmp_path / "data")
    assert gateway.lookup(key).rpm is None
    store.update("app-1", rpm=7)
    time.sleep(1.05)
    assert gateway.lookup(key).rpm == 7


@pytest.mark.parametrize("changes,match", [({"rpm": 0}, "rpm"), ({"budget_usd_day": -1.0}, "budget_usd_day"),
                                           ({"role": "root"}, "role"), ({"colour": "red"}, "unknown")])
def test_bad_limits_are_config_errors(store, changes, match):
    store.create("app-1")
    with pytest.raises(ConfigError, match=match):
        store.update("app-1", **changes)


def test_updating_an_unknown_key_is_a_config_error(store):
    with pytest.raises(ConfigError, match="no key named"):
        store.update("ghost", rpm=3)


def test_keys_file_from_before_roles_still_loads(store):
    store.path.parent.mkdir(parents=True)
    store.path.write_text('{"keys": [{"id": "key_1", "name": "old", "sha256": "ab", "created_at": "2026-01-01"}]}')
    assert store.entries()[0].role == "client"


def test_cli_creates_sets_and_lists_keys(tmp_path):
    data = str(tmp_path / "data")
    secret = arbitrage("keys", "create", "app", "--rpm", "60", "--budget-usd-day", "5", "--data-dir", data).stdout.strip()
    assert secret.startswith("sk-arb-")
    arbitrage("keys", "create", "boss", "--admin", "--data-dir", data)
    arbitrage("keys", "set", "app", "--rpm", "none", "--budget-usd-month", "100", "--data-dir", data)
    listing = arbitrage("keys", "list", "--data-dir", data).stdout
    assert "app\tclient\t$/day 5.0, $/month 100.0" in listing and "boss\tadmin\tno limits" in listing
    assert secret not in listing


@pytest.mark.parametrize("args,message", [(["set", "app"], "nothing to change"), (["set", "app", "--rpm", "0"], "greater than 0"),
                                          (["set", "ghost", "--rpm", "3"], "no key named"),
                                          (["create", "x", "--budget-usd-day", "lots"], "not a float")])
def test_cli_mistakes_get_a_message_not_a_traceback(tmp_path, args, message):
    data = str(tmp_path / "data")
    arbitrage("keys", "create", "app", "--data-dir", data)
    result = arbitrage("keys", *args, "--data-dir", data, check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
