"""load_config: defaults, the environment, strict TOML checking and flag overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from arbitrage.config import DEFAULT_UPSTREAM_URL, load_config
from arbitrage.errors import ConfigError

UPSTREAM = '[[upstreams]]\nname = "{name}"\nbase_url = "{url}"\n'


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "arbitrage.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def upstream(name: str = "a", url: str = "http://up.example/v1", extra: str = "") -> str:
    return UPSTREAM.format(name=name, url=url) + extra


def test_no_file_gives_defaults():
    config = load_config()
    assert (config.gateway.host, config.gateway.port, config.gateway.dev) == ("127.0.0.1", 8080, False)
    assert config.data_dir == Path("./arbitrage-data")
    assert config.prices == {}


def test_no_file_and_no_env_uses_the_openai_url():
    [only] = load_config().upstreams
    assert (only.name, only.base_url) == ("default", DEFAULT_UPSTREAM_URL)
    assert only.api_key_env == "OPENAI_API_KEY"


def test_openai_base_url_gives_the_one_upstream(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:9000/v1")
    assert [u.base_url for u in load_config().upstreams] == ["http://localhost:9000/v1"]


def test_bad_openai_base_url_is_a_config_error(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:9000")
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        load_config()


def test_file_upstreams_win_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env.example/v1")
    config = load_config(write(tmp_path, upstream("mine")))
    assert [u.name for u in config.upstreams] == ["mine"]


def test_file_values_are_read(tmp_path):
    text = '[gateway]\nport = 9999\ndata_dir = "/srv/arb"\n' + upstream("a", extra='models = ["gpt-*"]\n')
    config = load_config(write(tmp_path, text))
    assert (config.gateway.port, config.data_dir) == (9999, Path("/srv/arb"))
    assert config.upstreams[0].models == ["gpt-*"]


@pytest.mark.parametrize("text, key, where", [
    ("colour = 1\n", "colour", None),
    ("[gateway]\nprot = 1\n", "prot", "$.gateway"),
    (upstream(extra="timeoutt = 3\n"), "timeoutt", "$.upstreams[0]"),
    ("[capture]\nfsink = 'always'\n", "fsink", "$.capture"),
])
def test_unknown_key_is_named(tmp_path, text, key, where):
    message = config_error(tmp_path, text)
    assert f"`{key}`" in message
    assert where is None or where in message


@pytest.mark.parametrize("text, field", [
    ('[gateway]\nport = "8080"\n', "$.gateway.port"),
    ("[gateway]\ndev = 1\n", "$.gateway.dev"),
    (upstream(extra='models = "gpt-*"\n'), "$.upstreams[0].models"),
    ('[gateway]\nlog_level = "loud"\n', "$.gateway.log_level"),
])
def test_wrong_type_names_the_field(tmp_path, text, field):
    assert field in config_error(tmp_path, text)


def test_invalid_toml_is_a_config_error(tmp_path):
    assert "invalid TOML" in config_error(tmp_path, "[gateway\nport = 1\n")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_bad_port_is_a_config_error(tmp_path, port):
    assert "gateway.port" in config_error(tmp_path, f"[gateway]\nport = {port}\n")


@pytest.mark.parametrize("url", ["ftp://up.example/v1", "up.example/v1", "http://"])
def test_bad_base_url_is_a_config_error(tmp_path, url):
    assert "base_url" in config_error(tmp_path, upstream("a", url))


def test_duplicate_upstream_names_are_a_config_error(tmp_path):
    message = config_error(tmp_path, upstream("a") + upstream("a", "http://other.example/v1"))
    assert "unique" in message


def test_missing_required_upstream_field_is_named(tmp_path):
    assert "base_url" in config_error(tmp_path, '[[upstreams]]\nname = "a"\n')


def test_flag_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, '[gateway]\nport = 9000\ndata_dir = "/from/file"\n')
    config = load_config(path, port=9100, data_dir=str(tmp_path / "d"))
    assert (config.gateway.port, config.data_dir) == (9100, tmp_path / "d")


def test_unset_flags_leave_the_file_alone(tmp_path):
    config = load_config(write(tmp_path, "[gateway]\nport = 9000\n"), port=None, data_dir=None)
    assert config.gateway.port == 9000


def test_bad_port_flag_is_a_config_error():
    with pytest.raises(ConfigError, match="gateway.port"):
        load_config(port=70000)


def test_upstream_url_flag_replaces_the_file_upstreams(tmp_path):
    path = write(tmp_path, upstream("a") + upstream("b", "http://b.example/v1"))
    [only] = load_config(path, upstream_url="http://flag.example/v1").upstreams
    assert (only.name, only.base_url) == ("default", "http://flag.example/v1")


def test_bad_upstream_url_flag_is_a_config_error():
    with pytest.raises(ConfigError, match="base_url"):
        load_config(upstream_url="not a url")


def test_api_key_reads_the_named_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_UPSTREAM_KEY", "sk-upstream")
    [u] = load_config(write(tmp_path, upstream(extra='api_key_env = "MY_UPSTREAM_KEY"\n'))).upstreams
    assert u.api_key() == "sk-upstream"


def test_api_key_is_none_when_the_variable_is_unset(tmp_path):
    [u] = load_config(write(tmp_path, upstream(extra='api_key_env = "ABSENT_KEY_VAR"\n'))).upstreams
    assert u.api_key() is None


def test_api_key_is_read_at_use_not_at_load(monkeypatch):
    [u] = load_config().upstreams
    monkeypatch.setenv("OPENAI_API_KEY", "sk-later")
    assert u.api_key() == "sk-later"


def test_price_overrides_parse(tmp_path):
    text = '[prices."my-model"]\ninput_per_mtok = 0.5\noutput_per_mtok = 2\ncached_input_per_mtok = 0.1\n'
    price = load_config(write(tmp_path, text)).prices["my-model"]
    assert (price.input_per_mtok, price.output_per_mtok, price.cached_input_per_mtok) == (0.5, 2.0, 0.1)


def test_price_override_cached_rate_is_optional(tmp_path):
    text = '[prices."m"]\ninput_per_mtok = 1.0\noutput_per_mtok = 3.0\n'
    assert load_config(write(tmp_path, text)).prices["m"].cached_input_per_mtok is None


def test_price_override_needs_an_output_price(tmp_path):
    assert "output_per_mtok" in config_error(tmp_path, '[prices."m"]\ninput_per_mtok = 1.0\n')


def test_unknown_price_key_is_named(tmp_path):
    text = '[prices."m"]\ninput_per_mtok = 1.0\noutput_per_mtok = 3.0\ncache_per_mtok = 0.1\n'
    assert "`cache_per_mtok`" in config_error(tmp_path, text)


def test_gateway_that_is_not_a_table_is_a_config_error_with_flags(tmp_path):
    with pytest.raises(ConfigError, match="gateway"):
        load_config(write(tmp_path, 'gateway = "x"\n'), port=9000)
