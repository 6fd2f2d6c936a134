"""KeyStore: keys shown once, stored only as hashes, found, revoked, seen by other processes."""

from __future__ import annotations

import stat
import time

import pytest

from arbitrage.errors import ConfigError
from arbitrage.keys import KEYS_FILE, KeyStore


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
