"""The command line: clear one-line errors for user mistakes, help on every command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from arbitrage.cli import main
from tests.processes import arbitrage


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_serve_refuses_to_start_without_keys(tmp_path):
    result = arbitrage("serve", "--data-dir", str(tmp_path), check=False)
    assert result.returncode != 0
    assert "no gateway keys exist" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_dev_mode_off_loopback(tmp_path):
    result = arbitrage("serve", "--dev", "--host", "0.0.0.0", "--data-dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "only allowed on a loopback address" in result.stderr


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('[gateway]\nport = 9000\nprot = 1\n')
    result = arbitrage("serve", "--dev", "--config", str(config), "--data-dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "prot" in result.stderr and "Traceback" not in result.stderr


def test_keys_create_prints_the_key_once_and_lists_only_ids(tmp_path):
    created = run("keys", "create", "app1", "--data-dir", str(tmp_path))
    listed = run("keys", "list", "--data-dir", str(tmp_path))
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-arb-") and "app1" in listed.stdout and key not in listed.stdout


def test_sql_on_a_directory_that_is_not_a_store(tmp_path):
    result = run("sql", "SELECT 1", "--data-dir", str(tmp_path / "nothing"))
    assert result.exit_code == 1 and "not an arbitrage data directory" in result.output


def test_sql_json_and_query_errors(gw):
    rows = json.loads(run("sql", "SELECT 1 AS one, 'a' AS letter", "--json", "--data-dir", str(gw.data_dir)).stdout)
    bad = run("sql", "SELEC nonsense", "--data-dir", str(gw.data_dir))
    assert rows == [{"one": 1, "letter": "a"}]
    assert bad.exit_code == 1 and "query failed" in bad.output


def test_sql_prints_a_table(gw):
    result = run("sql", "SELECT count(*) AS calls_so_far FROM calls", "--data-dir", str(gw.data_dir))
    assert result.exit_code == 0 and "calls_so_far" in result.stdout


@pytest.mark.parametrize("command", [
    [], ["serve"], ["sql"], ["sim"], ["paths"], ["demo"], ["keys"], ["keys", "create"], ["keys", "list"],
    ["keys", "revoke"], ["distill"], ["distill", "build"], ["distill", "base"], ["distill", "train"]])
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and len(result.stdout.split("Options:")[0].split("\n", 2)[-1].strip()) > 20


def test_readme_config_example_is_valid(tmp_path):
    from pathlib import Path

    from arbitrage.config import load_config

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.toml").write_text(example)
    config = load_config(tmp_path / "example.toml")
    assert [u.name for u in config.upstreams] == ["openai", "together"]
    assert config.prices["my-finetuned-model"].cached_input_per_mtok == 0.15
