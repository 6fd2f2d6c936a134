"""Options and error handling shared by every command (their own module, so command modules in
other packages can use them without importing ``arbitrage.cli``, which imports them)."""

from __future__ import annotations

import functools

import click

from arbitrage.errors import ArbitrageError

CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="TOML config file (unknown keys are an error).")
DATA_DIR_OPTION = click.option("--data-dir", type=click.Path(file_okay=False),
                               help="Data directory [default: ./arbitrage-data, or the config's].")


def field_option(config_cls, *decls: str, field: str, **kwargs):
    """An option stored under a config field's name, with that field's help text and default
    (``config_cls`` is a ``DocumentedFields`` dataclass)."""
    default = config_cls.default_for(field)
    names = decls if field in decls else (*decls, field)
    return click.option(*names, help=config_cls.help_for(field), default=default,
                        show_default=default is not None and default is not False and default != (), **kwargs)


def friendly_errors(func):
    """Turn arbitrage's own errors into a one-line message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ArbitrageError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper
