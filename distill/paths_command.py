"""``arbitrage paths``: call paths ranked by spend, and which ones look worth distilling."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import click

from arbitrage.cli_options import CONFIG_OPTION, DATA_DIR_OPTION, friendly_errors
from arbitrage.config import load_config
from distill.analytics import PathStats, parse_since


class Since(click.ParamType):
    """A window start: a duration back from now, or an ISO date."""

    name = "DURATION|DATE"

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_since(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.option("--since", type=Since(), default="30d", show_default=True,
              help="Window start: a duration back from now (30m for minutes, 24h, 7d, 2w) or an ISO date (UTC).")
@CONFIG_OPTION
@DATA_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the window and one object per path.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Paths shown, by spend.")
@friendly_errors
def paths(since, config_path, data_dir, as_json, limit) -> None:
    """Call paths ranked by spend since a time, with a distillability verdict for each."""
    from arbitrage.capture.store import connect, retrying
    from distill.analytics import path_stats, total_calls

    store = load_config(config_path, data_dir=data_dir).data_dir
    con = connect(store)
    stats = retrying(lambda: path_stats(con, since, limit))
    total = 0 if stats else retrying(lambda: total_calls(con))
    if as_json:
        body = {"since": since.isoformat(), "paths": [dataclasses.asdict(s) for s in stats]}
        click.echo(json.dumps(body, indent=2, default=datetime.isoformat))
    elif not stats:
        older = f" ({total} older calls: try a longer --since)" if total else ""
        click.echo(f"no calls captured in {store} since {_when(since)}{older}")
    else:
        click.echo(f"call paths since {_when(since)}, by spend ($/month: dollars per day over each path's "
                   f"observed span x 30)\n")
        click.echo(_table([HEADER] + [_row(s) for s in stats]) + "\n")
        for s in stats:
            click.echo(_verdict_line(s))


HEADER = ["path", "model", "calls", "errors", "prompt tok", "compl tok", "dollars", "unpriced", "p50 ms",
          "$/month", "examples", "verdict"]
_LEFT = {0, 1, 11}


def _row(s: PathStats) -> list[str]:
    p50 = f"{s.p50_latency_ms:,.0f}" if s.p50_latency_ms is not None else "-"
    return [s.path, ",".join(s.models), f"{s.calls:,}", f"{s.errors:,}", f"{s.prompt_tokens:,}",
            f"{s.completion_tokens:,}", format_dollars(s.dollars), f"{s.unpriced_calls:,}", p50,
            format_dollars(s.monthly_dollars), f"{s.examples:,}", s.distillability.verdict]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) if i in _LEFT else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def _verdict_line(s: PathStats) -> str:
    line = f"{s.path}: {s.distillability.verdict}: " + "; ".join(s.distillability.reasons)
    return line if s.monthly_dollars is not None else f"{line}; no projection: {s.projection}"


def format_dollars(value: float | None) -> str:
    """Cents for a dollar or more, four decimals below, "-" for unknown."""
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if abs(value) >= 0.0001 else f"${value:.1e}"


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
