"""``arbitrage sim``: run the upstream simulator as an HTTP server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import uvicorn
from litestar import Litestar

from simulator.app import create_app
from simulator.config import SimulatorConfig
from simulator.dataset import DatasetError
from simulator.streaming import DeliberateDisconnect

_CONFIG_FIELDS = {config_field.name: config_field for config_field in fields(SimulatorConfig)}


def config_option(name: str, value_type: Any, show_default: bool = True) -> Callable:
    """A CLI option for one config field; its help text and default come from the config."""
    config_field = _CONFIG_FIELDS[name]
    return click.option(f"--{name.replace('_', '-')}", name, type=value_type,
                        default=config_field.default, show_default=show_default,
                        help=config_field.metadata["help"])


@click.command("sim")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8001, type=int, show_default=True, help="Port to listen on.")
@config_option("dataset", click.Path(dir_okay=False, path_type=Path), show_default=False)
@config_option("label_column", str, show_default=False)
@config_option("answer_key", str)
@config_option("default_model", str)
@config_option("latency_ms", click.FloatRange(min=0))
@config_option("latency_sigma", click.FloatRange(min=0))
@config_option("token_ms", click.FloatRange(min=0))
@config_option("slow_ms", click.FloatRange(min=0))
@config_option("seed", int)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="Server log level.")
def sim(host: str, port: int, log_level: str, **settings: Any) -> None:
    """Run an OpenAI-compatible upstream simulator that answers classification requests
    from a labelled data set (gold labels for known texts, the nearest known text's label
    otherwise), with realistic latency. Failure modes are chosen by the model name:
    error-NNN, slow, flaky-N, recover-N, cutoff, hang, each optionally followed by
    ':REALMODEL' (e.g. flaky-30:gpt-4o-mini)."""
    serve(build_app(settings), host, port, log_level)


def build_app(settings: dict[str, Any]) -> Litestar:
    """The app for these CLI settings; a bad setting or data set is a one-line CLI error."""
    try:
        return create_app(SimulatorConfig(**settings))
    except (DatasetError, ValueError) as error:
        raise click.ClickException(str(error)) from None


def serve(app: Litestar, host: str, port: int, log_level: str) -> None:
    """Serve the app with uvicorn (uvloop, httptools, no access log)."""
    server_config = uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools",
                                   access_log=False, log_level=log_level)
    logging.getLogger("uvicorn.error").addFilter(not_a_deliberate_disconnect)
    uvicorn.Server(server_config).run()


def not_a_deliberate_disconnect(record: logging.LogRecord) -> bool:
    """Log filter: drop the tracebacks of ``cutoff`` aborts, which are the simulator
    working as intended."""
    return not (record.exc_info and _caused_by_disconnect(record.exc_info[1]))


def _caused_by_disconnect(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, DeliberateDisconnect):
            return True
        if isinstance(error, BaseExceptionGroup):
            return any(_caused_by_disconnect(inner) for inner in error.exceptions)
        error = error.__cause__ or error.__context__
    return False
