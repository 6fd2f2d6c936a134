"""``arbitrage local up|down|status``: the local model server (vLLM) that serves the adapters.

``up`` starts vLLM detached (it keeps running after the command exits; pid file and log in
``<data_dir>/local``), waits until it is healthy, then loads every adapter the routing policies
need. ``down`` stops it. ``status`` asks any vLLM (``--url``, ``[local] url`` or the one ``up``
started) for its health, models and adapters. A server named by ``[local] url`` is run by someone
else: ``up`` and ``down`` refuse it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from arbitrage.cli_options import CONFIG_OPTION, DATA_DIR_OPTION, friendly_errors
from arbitrage.config import Config, LocalSettings, load_config
from arbitrage.errors import ArbitrageError, ConfigError

STATE_DIR = "local"
PROGRESS_EVERY_S = 10.0


def state_dir(config: Config) -> Path:
    """Where ``up`` keeps the server's pid file and log."""
    return config.data_dir / STATE_DIR


@click.group()
def local() -> None:
    """Start, stop and inspect the local model server (vLLM) that serves the adapters."""


@local.command()
@CONFIG_OPTION
@DATA_DIR_OPTION
@friendly_errors
def up(config_path, data_dir) -> None:
    """Start vLLM in the background with the base model, then load the adapters the routes need."""
    from deploy.vllm import LocalServer
    from distill.base import default_models_dir, resolve_base

    config = load_config(config_path, data_dir=data_dir)
    _refuse_external(config.local, "start")
    _check_python(config.local)
    base = resolve_base(config.local.base, default_models_dir())
    server = LocalServer(config.local, base.location, state_dir(config))
    click.echo(f"starting vLLM with {base.name} on {server.base_url} (log {server.log_path})", err=True)
    pid = server.start(wait=True, detached=True,
                       progress=_every(PROGRESS_EVERY_S, lambda m: click.echo(m, err=True)))
    click.echo(f"vLLM is up (pid {pid}); `arbitrage local down` stops it", err=True)
    load_adapters(config, server.base_url)


@local.command()
@CONFIG_OPTION
@DATA_DIR_OPTION
@friendly_errors
def down(config_path, data_dir) -> None:
    """Stop the vLLM that ``arbitrage local up`` started."""
    from deploy.vllm import LocalServer

    config = load_config(config_path, data_dir=data_dir)
    _refuse_external(config.local, "stop")
    server = LocalServer(config.local, "", state_dir(config))
    pid = server.running_pid()
    if not server.stop():
        click.echo(f"no local model server is running (nothing recorded in {server.state_dir})")
        return
    click.echo(f"stopped vLLM (pid {pid})")


@local.command()
@CONFIG_OPTION
@DATA_DIR_OPTION
@click.option("--url", help="Base URL of the vLLM to ask, e.g. http://host:8000/v1 [default: [local] url, "
                            "else its host and port].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def status(config_path, data_dir, url, as_json) -> None:
    """Health, served models and loaded adapters of the local model server; the adapters the routes need."""
    config = load_config(config_path, data_dir=data_dir)
    report = server_status(config, url)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"vLLM at {report['url']}: healthy")
    click.echo(f"models: {', '.join(report['models']) or 'none'}")
    for name, folder in report["adapters"].items():
        click.echo(f"adapter {name} (from {folder})")
    for name in report["missing"]:
        click.echo(f"adapter {name} is needed by a route but not loaded (arbitrage local up loads it; "
                   f"the gateway does too)")


def server_status(config: Config, url: str | None) -> dict[str, Any]:
    """What the server answers, and which adapters the routes need that it lacks; ConfigError when
    no healthy server answers."""
    from deploy.vllm import LocalClient
    from gateway.route_table import RouteTable

    base_url = (url or config.local.base_url).rstrip("/")
    client = LocalClient(base_url, _api_key(config.local), timeout=10.0)
    try:
        if not client.healthy():
            raise ConfigError(f"no healthy local model server at {base_url}: start one with `arbitrage local up`"
                              f"{_log_hint(config) if not url and not config.local.url else ''}")
        models = [m["id"] for m in client.models()]
        adapters = client.adapters()
    finally:
        client.close()
    needed = RouteTable(config).needed_adapters()
    return {"url": base_url, "healthy": True, "models": models, "adapters": adapters,
            "missing": sorted(set(needed) - set(adapters))}


def load_adapters(config: Config, base_url: str) -> None:
    """Load every adapter the routing policies need; a missing folder or a refusal is an error
    (the server keeps running)."""
    from deploy.vllm import LocalClient
    from gateway.route_table import RouteTable

    needed = RouteTable(config).needed_adapters()
    if not needed:
        click.echo("no route needs an adapter yet (arbitrage route promote PATH --adapter vN)", err=True)
        return
    client = LocalClient(base_url, _api_key(config.local), timeout=120.0)
    failures = []
    try:
        for name, folder in needed.items():
            failures += _load(client, name, folder)
    finally:
        client.close()
    if failures:
        raise ConfigError("vLLM is running, but these adapters did not load: " + "; ".join(failures))


def _load(client, name: str, folder: Path) -> list[str]:
    if not folder.is_dir():
        return [f"{name}: no adapter folder {folder}"]
    try:
        loaded = client.load_adapter(name, folder)
    except ArbitrageError as exc:
        return [f"{name}: {exc}"]
    click.echo(f"adapter {name} {'loaded' if loaded else 'already loaded'} from {folder}", err=True)
    return []


def _refuse_external(settings: LocalSettings, verb: str) -> None:
    if settings.url:
        raise ConfigError(f"[local] url is set ({settings.url}): that server is run by someone else, so "
                          f"`arbitrage local` does not {verb} it (`arbitrage local status` asks it)")


def _check_python(settings: LocalSettings) -> None:
    """Fail before preparing the base model when the interpreter that runs vLLM is missing."""
    from deploy.vllm import PYTHON_ENV, vllm_python

    python = vllm_python(settings)
    if not Path(python).exists() and not shutil.which(python):
        raise ConfigError(f"no Python interpreter at {python!r} to run vLLM: set [local] python or "
                          f"${PYTHON_ENV}, or run scripts/install")


def _api_key(settings: LocalSettings) -> str | None:
    return os.environ.get(settings.api_key_env) if settings.api_key_env else None


def _log_hint(config: Config) -> str:
    from deploy.vllm import LOG_FILE, PID_FILE

    folder = state_dir(config)
    if not (folder / PID_FILE).exists():
        return ""
    return f" (a server was started: see its log {folder / LOG_FILE})"


def _every(seconds: float, echo):
    """A progress callback that passes a message on at most once per ``seconds``."""
    last = [float("-inf")]

    def progress(message: str) -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            echo(message)

    return progress
