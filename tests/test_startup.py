"""Refusing unsafe setups at start, and checking gateway keys on each request."""

from __future__ import annotations

import pytest

from arbitrage.config import Config, GatewaySettings
from arbitrage.errors import AuthenticationError, ConfigError
from arbitrage.keys import KeyStore
from gateway.auth import DEV_KEY_ID, Authenticator
from gateway.service import check_startup


@pytest.fixture
def keys(tmp_path) -> KeyStore:
    return KeyStore(tmp_path)


def config(host: str = "127.0.0.1", dev: bool = False) -> Config:
    return Config(gateway=GatewaySettings(host=host, dev=dev))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "gateway.internal"])
def test_dev_off_loopback_is_refused(keys, host):
    keys.create("app")
    with pytest.raises(ConfigError, match="loopback"):
        check_startup(config(host, dev=True), keys)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_dev_on_loopback_needs_no_keys(keys, host):
    assert check_startup(config(host, dev=True), keys) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_no_keys_without_dev_is_refused(keys, host):
    with pytest.raises(ConfigError, match="no gateway keys"):
        check_startup(config(host), keys)


def test_keys_allow_any_host(keys):
    keys.create("app")
    assert check_startup(config("0.0.0.0"), keys) is None


def test_dev_accepts_anything(keys):
    auth = Authenticator(keys, dev=True)
    assert [auth.authenticate(h) for h in (None, "", "Bearer nope", "Basic x")] == [DEV_KEY_ID] * 4


def rejected(auth: Authenticator, header: str | None) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate(header)
    assert info.value.status_code == 401
    return info.value


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_a_401(keys, header):
    assert rejected(Authenticator(keys, dev=False), header).code == "missing_api_key"


def test_wrong_key_is_a_401(keys):
    keys.create("app")
    assert rejected(Authenticator(keys, dev=False), "Bearer sk-arb-wrong").code == "invalid_api_key"


@pytest.mark.parametrize("scheme", ["Basic", "Token", ""])
def test_right_key_with_wrong_scheme_is_a_401(keys, scheme):
    _, key = keys.create("app")
    assert rejected(Authenticator(keys, dev=False), f"{scheme} {key}").code == "invalid_api_key"


def test_bare_key_without_scheme_is_a_401(keys):
    _, key = keys.create("app")
    assert rejected(Authenticator(keys, dev=False), key).code == "invalid_api_key"


@pytest.mark.parametrize("template", ["Bearer {}", "bearer {}", "BEARER  {} "])
def test_valid_key_gives_its_id(keys, template):
    entry, key = keys.create("app")
    assert Authenticator(keys, dev=False).authenticate(template.format(key)) == entry.id


def test_revoked_key_is_a_401(keys):
    _, key = keys.create("app")
    keys.revoke("app")
    assert rejected(Authenticator(keys, dev=False), f"Bearer {key}").code == "invalid_api_key"


def test_upstream_style_key_is_not_a_gateway_key(keys):
    keys.create("app")
    assert rejected(Authenticator(keys, dev=False), "Bearer sk-proj-abc123").code == "invalid_api_key"
