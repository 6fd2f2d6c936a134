"""The ``arbitrage`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from arbitrage.cli_options import CONFIG_OPTION, DATA_DIR_OPTION, friendly_errors
from arbitrage.config import load_config
from arbitrage.route_command import route
from deploy.local_command import local
from distill.build_command import distill
from distill.eval_command import evaluate as distill_eval
from distill.paths_command import paths
from distill.roi_command import roi
from distill.train_command import base as distill_base
from distill.train_command import train as distill_train
from simulator.cli import sim

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """arbitrage: an OpenAI-compatible gateway that records every call, so the
    expensive call paths can be distilled into a model you own."""


@main.command()
@CONFIG_OPTION
@click.option("--host", help="Address to bind [default: 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [default: 8080].")
@DATA_DIR_OPTION
@click.option("--upstream-url", help="Base URL of the one upstream [default: $OPENAI_BASE_URL or OpenAI's].")
@click.option("--dev", is_flag=True, default=None, help="Accept any key (loopback only).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker processes [default: 1, or the config's].")
@friendly_errors
def serve(config_path, host, port, data_dir, upstream_url, dev, log_level, workers) -> None:
    """Run the gateway: point OPENAI_BASE_URL at http://HOST:PORT/v1."""
    from arbitrage.capture.store import CaptureStore
    from arbitrage.keys import KeyStore
    from gateway.app import configure_logging, serve as serve_gateway
    from gateway.service import check_startup

    config = load_config(config_path, host=host, port=port, data_dir=data_dir, dev=dev, log_level=log_level,
                         upstream_url=upstream_url, workers=workers)
    configure_logging(config.gateway.log_level)
    check_startup(config, KeyStore(config.data_dir))
    if config.capture_url:  # an unreachable bucket stops the start here, with one clear line
        CaptureStore(config.data_dir, config.capture, config.capture_url).prepare_location()
    upstreams = ", ".join(f"{u.name}={u.base_url}" for u in config.upstreams)
    data = f"{config.capture_url} spooled in {config.data_dir}" if config.capture_url else config.data_dir
    click.echo(f"arbitrage gateway on http://{config.gateway.host}:{config.gateway.port}/v1 "
               f"(upstreams: {upstreams}; data: {data}; workers: {config.gateway.workers})", err=True)
    serve_gateway(config)


@main.group()
def keys() -> None:
    """Manage gateway keys (stored as hashes; a key is shown once)."""


def _keystore(config_path, data_dir):
    from arbitrage.keys import KeyStore

    return KeyStore(load_config(config_path, data_dir=data_dir).data_dir)


class _Limit(click.ParamType):
    """A positive number, or "none" (returned as ``_NO_LIMIT``) to remove the limit."""

    name = "AMOUNT|none"

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def convert(self, value, param, ctx):
        if value is _NO_LIMIT or str(value).lower() == "none":
            return _NO_LIMIT
        try:
            number = self.kind(value)
        except ValueError:
            self.fail(f"{value!r} is not a {self.kind.__name__} (or 'none')", param, ctx)
        if number <= 0:
            self.fail(f"{value!r} must be greater than 0 (or 'none' for no limit)", param, ctx)
        return number


_NO_LIMIT = object()


def key_limit_options(command):
    """The role and limit options shared by ``keys create`` and ``keys set``."""
    options = [
        click.option("--role", type=click.Choice(["client", "metrics", "admin"]), default=None,
                     help="client: the OpenAI endpoints; metrics: only /metrics; admin: everything. [create: client]"),
        click.option("--admin", is_flag=True, default=False, help="Same as --role admin."),
        click.option("--budget-usd-day", type=_Limit(float), default=None,
                     help="Dollars this key may spend per UTC day ('none': no limit)."),
        click.option("--budget-usd-month", type=_Limit(float), default=None,
                     help="Dollars this key may spend per UTC calendar month ('none': no limit)."),
        click.option("--rpm", type=_Limit(int), default=None,
                     help="Requests per minute (token bucket; 'none': no limit)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _key_changes(role, admin, **limits) -> dict:
    changes = {k: None if v is _NO_LIMIT else v for k, v in limits.items() if v is not None}
    if admin or role:
        changes["role"] = "admin" if admin else role
    return changes


def _describe(entry) -> str:
    limits = [f"{label} {value}" for label, value in (("$/day", entry.budget_usd_day), ("$/month", entry.budget_usd_month),
                                                     ("rpm", entry.rpm)) if value is not None]
    return f"{entry.id}\t{entry.name}\t{entry.role}\t{', '.join(limits) or 'no limits'}\t{entry.created_at}"


@keys.command("create")
@click.argument("name")
@key_limit_options
@CONFIG_OPTION
@DATA_DIR_OPTION
@friendly_errors
def keys_create(name, role, admin, budget_usd_day, budget_usd_month, rpm, config_path, data_dir) -> None:
    """Create a key named NAME and print it (only this once)."""
    from arbitrage.keys import KeyLimits

    limits = KeyLimits(**_key_changes(role, admin, budget_usd_day=budget_usd_day, budget_usd_month=budget_usd_month,
                                      rpm=rpm))
    entry, secret = _keystore(config_path, data_dir).create(name, limits)
    click.echo(f"created {entry.role} key {entry.id} ({entry.name}); it is shown only now:", err=True)
    click.echo(secret)


@keys.command("set")
@click.argument("name")
@key_limit_options
@CONFIG_OPTION
@DATA_DIR_OPTION
@friendly_errors
def keys_set(name, role, admin, budget_usd_day, budget_usd_month, rpm, config_path, data_dir) -> None:
    """Change the role or limits of the key named NAME (the gateway applies them within a second)."""
    changes = _key_changes(role, admin, budget_usd_day=budget_usd_day, budget_usd_month=budget_usd_month, rpm=rpm)
    if not changes:
        raise click.UsageError("nothing to change: give --role, --admin, --budget-usd-day, --budget-usd-month or --rpm")
    click.echo(_describe(_keystore(config_path, data_dir).update(name, **changes)))


@keys.command("list")
@CONFIG_OPTION
@DATA_DIR_OPTION
@friendly_errors
def keys_list(config_path, data_dir) -> None:
    """List keys: id, name, role, limits, creation time (never the keys)."""
    for entry in _keystore(config_path, data_dir).entries():
        click.echo(_describe(entry))


@keys.command("revoke")
@click.argument("name")
@CONFIG_OPTION
@DATA_DIR_OPTION
@friendly_errors
def keys_revoke(name, config_path, data_dir) -> None:
    """Delete the key named NAME; the gateway stops accepting it within a second."""
    entry = _keystore(config_path, data_dir).revoke(name)
    click.echo(f"revoked key {entry.id} ({entry.name})")


@main.command()
@click.argument("query")
@CONFIG_OPTION
@DATA_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of row objects.")
@click.option("--max-rows", type=int, default=100, show_default=True, help="Rows shown in the table.")
@friendly_errors
def sql(query, config_path, data_dir, as_json, max_rows) -> None:
    """Run a DuckDB QUERY over the capture views (e.g. calls) and print the result."""
    import duckdb

    from arbitrage.capture.store import connect, retrying

    con = connect(load_config(config_path, data_dir=data_dir).data_dir)

    def run() -> None:
        """Run the query once and print it (a retry runs it again only if it failed before printing)."""
        relation = con.sql(query)
        if relation is None:
            return
        if as_json:
            rows = [dict(zip(relation.columns, row)) for row in relation.fetchall()]
            click.echo(json.dumps(rows, default=str, indent=2))
        else:
            relation.show(max_rows=max_rows, max_width=max(120, _terminal_width()))

    try:
        retrying(run)
    except duckdb.Error as exc:
        raise click.ClickException(f"query failed: {exc}") from None


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((160, 24)).columns


main.add_command(sim)
main.add_command(paths)
main.add_command(roi)
main.add_command(route)
main.add_command(local)
distill.add_command(distill_base)
distill.add_command(distill_train)
distill.add_command(distill_eval)
main.add_command(distill)


@main.command()
@click.option("--quick", is_flag=True,
              help="The small run: 5 intents, a few hundred requests, 100 training steps (under 10 minutes on 2 "
                   "cores); without it, the benchmark-sized run (all 77 intents, every training text).")
@click.option("--data-dir", type=click.Path(file_okay=False), default="./arbitrage-demo", show_default=True,
              help="Each run works in a fresh folder below this one (run-<UTC time>).")
@click.option("--stop-after", type=click.Choice(["capture", "paths", "build", "train", "serve", "eval", "promote",
                                                 "ramp", "roi"]), default="roi", show_default=True,
              help="Stop after this step (every server is stopped either way).")
@click.option("--vllm-url", metavar="URL",
              help="Use this running vLLM (serving the SmolLM2 base with runtime LoRA loading) instead of starting one.")
@click.option("--volume-per-day", type=click.IntRange(1), default=20_000, show_default=True,
              help="Requests a day on the path, for the breakeven date.")
@friendly_errors
def demo(quick, data_dir, stop_after, vllm_url, volume_per_day) -> None:
    """The whole loop, offline, on real parts: the simulator as the frontier API and the gateway in front of
    it, app traffic through the openai client, paths, training set, LoRA adapter, evaluation through vLLM,
    promotion in shadow mode, the ramp on shadow evidence, and the money. Ctrl-C stops everything it started."""
    from arbitrage.demo import Economics, run_demo

    try:
        run_demo(Path(data_dir), quick, stop_after, vllm_url, Economics(volume_per_day=volume_per_day))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
