"""``arbitrage route ...`` end to end against a real gateway process, and ``arbitrage local ...``
failure paths (no vLLM needed: an unreachable server, a missing or broken interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.processes import ARBITRAGE, free_port
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
    assert header.split() == ["path", "mode", "share", "threshold", "adapter", "comparator", "history",
                              "calibrated", "(shadow", "data)"]
    row = next(r.split() for r in rows if r.startswith("support/intents"))
    assert ["support/intents", "canary", "10%", "0.8", "v1", "exact"] == row[:6]
    assert row[7:] == ["not", "yet", "(0", "compared)"], "no shadow comparisons yet: no calibrated threshold"


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
