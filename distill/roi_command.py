"""``arbitrage roi``: what distillation cost, what it saves per month, when it pays back."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import msgspec

from arbitrage.cli_options import CONFIG_OPTION, DATA_DIR_OPTION, friendly_errors
from arbitrage.config import EconomicsSettings, load_config
from arbitrage.errors import ConfigError
from distill.paths_command import Since, format_dollars
from distill.roi import DAYS_PER_MONTH, RETURN_MONTHS, PathROI, Report

PRICE = click.FloatRange(min=0)


@click.command()
@click.option("--since", type=Since(), default="30d", show_default=True,
              help="Window start: a duration back from now (24h, 7d, 2w) or an ISO date (UTC).")
@CONFIG_OPTION
@DATA_DIR_OPTION
@click.option("--training-usd-per-hour", type=PRICE, help="Training machine price [default: the config's].")
@click.option("--serving-usd-per-hour", type=PRICE, help="Always-on local model server price [default: the config's].")
@click.option("--serving-usd-per-mtok", type=PRICE,
              help="Local serving price per million tokens, instead of per hour [default: the config's].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: window, assumptions, paths, total.")
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG: cumulative savings against the one-time cost, breakeven marked.")
@friendly_errors
def roi(since, config_path, data_dir, training_usd_per_hour, serving_usd_per_hour, serving_usd_per_mtok,
        as_json, chart) -> None:
    """One-time distillation cost, monthly spend before and now, savings, breakeven and 12-month
    return, per call path and in total, from the captured calls and the dataset and adapter manifests."""
    from arbitrage.capture.store import connect, retrying
    from distill.roi import build_report

    config = load_config(config_path, data_dir=data_dir)
    settings = economics(config.economics, training_usd_per_hour, serving_usd_per_hour, serving_usd_per_mtok)
    with contextlib.closing(connect(config.data_dir)) as con:  # one connection: a retry re-reads the views
        report = retrying(lambda: build_report(con, config.data_dir, settings, since))
    if chart:
        write_chart(report, chart)
    click.echo(json.dumps(report_json(report), indent=2) if as_json else render(report))
    if chart:
        click.echo(f"chart written to {chart}", err=True)


def economics(base: EconomicsSettings, training: float | None, per_hour: float | None,
              per_mtok: float | None) -> EconomicsSettings:
    """The config's prices with the flags' overrides (a serving flag replaces both serving prices)."""
    raw = msgspec.to_builtins(base)
    if training is not None:
        raw["training_usd_per_hour"] = training
    if per_hour is not None or per_mtok is not None:
        raw.update(serving_usd_per_hour=per_hour, serving_usd_per_mtok=per_mtok)
    try:
        return msgspec.convert(raw, EconomicsSettings)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"prices: {exc}") from None


def report_json(report: Report) -> dict:
    """The report as JSON-ready builtins (times as ISO strings, one-time total included)."""
    def path(p: PathROI) -> dict:
        body = dataclasses.asdict(p)
        body["one_time"]["total_usd"] = p.one_time.total_usd
        return body

    body = {"since": report.since, "now": report.now, "days_per_month": DAYS_PER_MONTH, "assumptions": report.assumptions,
            "paths": [path(p) for p in report.paths], "total": path(report.total)}
    return json.loads(json.dumps(body, default=_iso))


def _iso(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


HEADER = ["path", "calls", "local", "one-time", "before/mo", "now/mo", "savings/mo", "breakeven",
          f"{RETURN_MONTHS}-mo return"]


def render(report: Report) -> str:
    """The terminal report: window, table, what is missing, assumptions."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*HEADER, box=None, header_style="bold", pad_edge=False)
    for column in table.columns[1:]:
        column.justify = "right"
    for p in [*report.paths, report.total]:
        table.add_row(*_row(p), end_section=bool(report.paths) and p is report.paths[-1])
    console = Console(width=max(120, _terminal_width()), record=True, markup=False, highlight=False,
                      file=io.StringIO())
    console.print(table)
    body = console.export_text().rstrip() if report.paths else "no calls, datasets or adapters found"
    head = f"ROI since {_when(report.since)} (to {_when(report.now)}); dollars per {DAYS_PER_MONTH}-day month\n"
    return "\n".join([head, body, _notes(report)])


def _row(p: PathROI) -> list[str]:
    return [p.path, f"{p.calls:,}", f"{p.local_calls:,}", format_dollars(p.one_time.total_usd),
            format_dollars(p.before_usd), format_dollars(p.now_usd), format_dollars(p.savings_usd),
            p.breakeven.strftime("%Y-%m-%d") if p.breakeven else "-", format_dollars(p.return_12m_usd)]


def _notes(report: Report) -> str:
    lines = ["", "missing:"] if any(p.missing for p in [*report.paths, report.total]) else []
    lines += [f"  {p.path}: " + "; ".join(p.missing) for p in [*report.paths, report.total] if p.missing]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in report.assumptions]
    return "\n".join(lines)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((160, 24)).columns


def write_chart(report: Report, target: Path) -> None:
    """A PNG of cumulative savings (total and per path) against the one-time cost, breakeven marked;
    written to a temporary name and renamed into place."""
    total = report.total
    if total.savings_start is None or total.savings_usd is None or total.one_time.total_usd is None:
        raise click.ClickException("no chart: " + ("; ".join(total.missing) or "nothing to chart"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    end = _chart_end(total)
    saving = [p for p in report.paths if p.savings_start and p.savings_usd is not None]
    for p in saving if len(saving) > 1 else []:
        ax.plot(*_savings_line(p, p.savings_start, end), linewidth=1, alpha=0.7, label=f"{p.path} savings")
    ax.plot(*_savings_line(total, total.savings_start, end), linewidth=2.5, color="tab:green", label="total savings")
    ax.axhline(total.one_time.total_usd, color="tab:red", linestyle="--",
               label=f"one-time cost {format_dollars(total.one_time.total_usd)}")
    _mark_breakeven(ax, total)
    ax.axvline(report.now, color="grey", linewidth=0.8, linestyle=":", label="now")
    ax.set(title=f"Cumulative savings at {format_dollars(total.savings_usd)}/month (window since {_when(report.since)})",
           ylabel="dollars", xlabel="date")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, target)
    plt.close(fig)


def _chart_end(total: PathROI) -> datetime:
    horizon = total.savings_start + timedelta(days=DAYS_PER_MONTH * RETURN_MONTHS)
    return max(horizon, total.breakeven + timedelta(days=DAYS_PER_MONTH)) if total.breakeven else horizon


def _savings_line(p: PathROI, start: datetime, end: datetime) -> tuple[list[datetime], list[float]]:
    per_day = p.savings_usd / DAYS_PER_MONTH
    return [start, end], [0.0, per_day * ((end - start) / timedelta(days=1))]


def _mark_breakeven(ax, total: PathROI) -> None:
    if total.breakeven is None:
        ax.text(0.99, 0.02, "no breakeven: " + "; ".join(total.missing), transform=ax.transAxes,
                ha="right", va="bottom", color="tab:red")
        return
    ax.axvline(total.breakeven, color="black", linewidth=1)
    ax.plot([total.breakeven], [total.one_time.total_usd], "ko", markersize=8)
    ax.annotate(f"breakeven {total.breakeven:%Y-%m-%d}", (total.breakeven, total.one_time.total_usd),
                xytext=(8, -16), textcoords="offset points")


def _save(fig, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temp, format="png", dpi=110)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
