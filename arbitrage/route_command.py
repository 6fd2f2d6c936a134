"""``arbitrage route show|set|promote|rollback``: the routing policies of a running gateway,
through its admin API (gateway/admin.py), so every worker sees a change within a second and the
change is recorded with its reason.

The gateway is ``--url``, else the config's ``[gateway]`` host and port; the key is
``--admin-key``, else ``$ARBITRAGE_ADMIN_KEY`` (an ``admin`` key: ``arbitrage keys create NAME --admin``).
"""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import quote

import click
import httpx

from arbitrage.cli_options import CONFIG_OPTION, friendly_errors
from arbitrage.config import load_config
from gateway.shadow_report import MAX_DISAGREEMENTS, VERDICTS

ADMIN_KEY_ENV = "ARBITRAGE_ADMIN_KEY"
HEADER = ["path", "mode", "share", "threshold", "adapter", "comparator", "history", "ramp evidence",
          "calibrated (shadow data)"]


def gateway_options(command):
    """``--url``, ``--admin-key`` and ``--config``, shared by every route command."""
    options = [
        click.option("--url", help="The gateway, e.g. http://127.0.0.1:8080 [default: the config's host and port]."),
        click.option("--admin-key", envvar=ADMIN_KEY_ENV, show_envvar=True,
                     help="An admin gateway key (arbitrage keys create NAME --admin)."),
        CONFIG_OPTION,
    ]
    for option in reversed(options):
        command = option(command)
    return command


class AdminClient:
    """The few calls the route commands make to ``/admin/routes``; errors become one-line ClickExceptions."""

    def __init__(self, url: str, admin_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.has_key = bool(admin_key)
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.http = httpx.Client(headers=headers, timeout=30.0)

    def call(self, method: str, path: str = "", action: str = "", **kwargs) -> dict[str, Any]:
        route = "/admin/routes" + (f"/{quote(path, safe='/')}" if path else "") + (f"/{action}" if action else "")
        try:
            response = self.http.request(method, self.url + route, **kwargs)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"no gateway answers at {self.url} ({exc}): is `arbitrage serve` running? "
                                       f"(--url names another)") from None
        if response.status_code >= 400:
            raise click.ClickException(self._refusal(response))
        return response.json()

    def _refusal(self, response: httpx.Response) -> str:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300] or response.reason_phrase
        if response.status_code == 401:
            hint = "" if self.has_key else f" (give --admin-key or set ${ADMIN_KEY_ENV})"
            return f"the gateway refused the key: {message}{hint}"
        if response.status_code == 403:
            return f"{message} Use an admin key (arbitrage keys create NAME --admin)."
        return message


def _client(url: str | None, admin_key: str | None, config_path: str | None) -> AdminClient:
    if url is None:
        gateway = load_config(config_path).gateway
        host = "127.0.0.1" if gateway.host in ("0.0.0.0", "::", "") else gateway.host
        url = f"http://{host}:{gateway.port}"
    return AdminClient(url, admin_key)


@click.group()
def route() -> None:
    """Show and change the routing policy of call paths on a running gateway."""


@route.command("show")
@click.argument("path", required=False)
@click.option("--disagreements", type=click.IntRange(1, MAX_DISAGREEMENTS), metavar="N",
              help="Also PATH's N most confident shadow/audit disagreements, with their inputs: where the "
                   "upstream model's own mistakes show up first.")
@click.option("--json", "as_json", is_flag=True, help="Print the policies as JSON.")
@gateway_options
@friendly_errors
def show(path, disagreements, as_json, url, admin_key, config_path) -> None:
    """Every path's policy (or PATH's): mode, share, threshold, adapter, comparator."""
    if disagreements and not path:
        raise click.UsageError("--disagreements needs a PATH (arbitrage route show PATH --disagreements 20)")
    client = _client(url, admin_key, config_path)
    params = {"disagreements": disagreements} if disagreements else {}
    routes = {path: client.call("GET", path, params=params)} if path else client.call("GET")["routes"]
    if as_json:
        click.echo(json.dumps(routes, indent=2))
    elif not routes:
        click.echo("no routing policies: every path goes upstream (arbitrage route set PATH --mode shadow ...)")
    else:
        click.echo(render(routes))
        if disagreements:
            click.echo("\n" + render_disagreements(path, routes[path]))


def render(routes: dict[str, dict[str, Any]]) -> str:
    """The policies as a table, one row per path."""
    from rich.table import Table

    table = Table(*HEADER, box=None, header_style="bold", pad_edge=False)
    for path, entry in routes.items():
        table.add_row(*_row(path, entry))
    return _text(table)


def render_disagreements(path: str, entry: dict[str, Any]) -> str:
    """A path's most confident disagreements as a table, under a line saying how many there are."""
    from rich.table import Table

    found = (entry.get("status") or {}).get("disagreements")
    if found is None:
        return f"{path}: no adapter, so no comparisons (arbitrage route promote {path} --adapter V)"
    if "error" in found:
        return f"{path}: the shadow table could not be read: {found['error']}"
    if not found["shown"]:
        return f"{path}: no disagreements among the shadow and audit comparisons of adapter {entry['policy']['adapter']}"
    table = Table("confidence", "comparison", "kind", "time (UTC)", "upstream", "local", "input", "reviewed",
                  box=None, header_style="bold", pad_edge=False)
    for row in found["shown"]:
        confidence = "-" if row["confidence"] is None else f"{row['confidence']:.4f}"
        table.add_row(confidence, row["shadow_id"], row["kind"], row["ts"][:19].replace("T", " "),
                      _cell(row["upstream_answer"], 24), _cell(row["local_answer"], 24), _cell(row["input"], 48),
                      row["verdict"] or "-")
    heading = (f"{path}: the {len(found['shown'])} most confident of {found['total']} disagreements "
               f"(adapter {entry['policy']['adapter']}), most confident first "
               f"(arbitrage route review {path} COMPARISON --verdict ...):")
    return heading + "\n" + _text(table)


def _cell(text: str | None, width: int = 30) -> str:
    """One line of at most ``width`` characters."""
    if text is None:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"


def _text(table) -> str:
    from rich.console import Console

    console = Console(width=160, record=True, markup=False, highlight=False, file=io.StringIO())
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().rstrip().splitlines())


def _row(path: str, entry: dict[str, Any]) -> list[str]:
    p = entry["policy"]
    return [path, p["mode"], f"{p['share']:g}%", f"{p['threshold']:g}", p["adapter"] or "-",
            p["comparator"]["name"], str(entry.get("history", 0)), render_ramp_evidence(p, entry.get("status") or {}),
            _calibrated(entry.get("status") or {})]


def render_ramp_evidence(policy: dict[str, Any], status: dict[str, Any]) -> str:
    """What the ramp decides on: agreed of compared under the policy in force, the Wilson lower
    bound it holds against the target, and what it waits for."""
    ramp = policy["ramp"]
    if not ramp["enabled"]:
        return "ramp off"
    evidence = status.get("evidence")
    if not evidence:
        return "none yet"
    waiting = {"too_few_samples": f"needs {ramp['min_samples']}", "within_bounds": f"target {ramp['target']:g}",
               "at_top": "top step", "below_floor": f"under floor {ramp['floor']:g}"}.get(evidence.get("ramp"))
    shown = f"{evidence['agreed']}/{evidence['n']}, lower {evidence['lower']:.3f}"
    return f"{shown} ({waiting})" if waiting else shown


def _calibrated(status: dict[str, Any]) -> str:
    """The threshold calibrated on shadow data, with its sample count (and how many of the
    comparisons a review found the upstream answer wrong in)."""
    calibration = status.get("calibration")
    if not calibration or "samples" not in calibration:
        return "-"
    threshold = calibration["threshold"]
    shown = f"{threshold:.4g}" if threshold is not None else "not yet"
    overruled = calibration.get("reviewed_upstream_wrong")
    return f"{shown} ({calibration['samples']} compared{f', {overruled} upstream wrong' if overruled else ''})"


@route.command("set")
@click.argument("path")
@click.option("--mode", type=click.Choice(["off", "shadow", "canary", "local"]),
              help="off: upstream only; shadow: measure agreement; canary: SHARE % local; local: all local.")
@click.option("--adapter", help="Adapter version of this path (v3).")
@click.option("--share", type=click.FloatRange(0, 100), help="Percent of requests tried locally.")
@click.option("--threshold", type=click.FloatRange(0, 1), help="Serve a local answer only at this confidence or more.")
@click.option("--comparator", help="How agreement is judged: exact, json, numeric, similarity, judge.")
@click.option("--shadow-rate", type=click.FloatRange(0, 1), help="Share (0-1) of upstream-served calls also asked locally.")
@click.option("--audit-rate", type=click.FloatRange(0, 1), help="Share (0-1) of locally served calls also asked upstream.")
@click.option("--confidence", help="Confidence scorer: joint, min, mean.")
@click.option("--ramp/--no-ramp", "ramp_enabled", default=None, help="Let the ramp controller move the share.")
@click.option("--reason", help="Why (kept in the route_changes record).")
@gateway_options
@friendly_errors
def set_route(path, reason, url, admin_key, config_path, **options) -> None:
    """Change PATH's policy: only the options given change (a new path starts from mode off)."""
    fields = _fields(options)
    if not fields:
        raise click.UsageError("nothing to change: give --mode, --share, --threshold, --adapter, ...")
    entry = _client(url, admin_key, config_path).call("PUT", path, json=fields, params=_params(reason))
    click.echo(summary(entry))


def _fields(options: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in options.items() if v is not None and k not in ("comparator", "ramp_enabled")}
    if options.get("comparator"):
        fields["comparator"] = {"name": options["comparator"]}
    if options.get("ramp_enabled") is not None:
        fields["ramp"] = {"enabled": options["ramp_enabled"]}
    return fields


@route.command("promote")
@click.argument("path")
@click.option("--adapter", required=True, help="Adapter version of this path to promote (v3).")
@click.option("--threshold", type=click.FloatRange(0, 1),
              help="Confidence threshold [default: the latest eval's calibrated one, else its at-target one].")
@click.option("--reason", help="Why (kept in the route_changes record).")
@gateway_options
@friendly_errors
def promote(path, adapter, threshold, reason, url, admin_key, config_path) -> None:
    """Put an adapter of PATH in shadow mode (share 0): the gateway loads it and starts measuring."""
    body = {"adapter": adapter, **({"threshold": threshold} if threshold is not None else {})}
    entry = _client(url, admin_key, config_path).call("POST", path, "promote", json=body, params=_params(reason))
    click.echo(summary(entry))


@route.command("rollback")
@click.argument("path")
@click.option("--reason", help="Why (kept in the route_changes record).")
@gateway_options
@friendly_errors
def rollback(path, reason, url, admin_key, config_path) -> None:
    """Restore PATH's previous policy (without one: shadow mode, share 0)."""
    entry = _client(url, admin_key, config_path).call("POST", path, "rollback", params=_params(reason))
    click.echo(summary(entry))


@route.command("review")
@click.argument("path")
@click.argument("comparison", required=False)
@click.option("--verdict", type=click.Choice(VERDICTS),
              help="upstream_wrong: the local answer was right (the calibration and the ramp then count the "
                   "comparison as agreed); local_wrong: the upstream answer was right; ambiguous: the input fits both.")
@click.option("--note", help="Why (kept in the reviews table).")
@click.option("--file", "verdicts_file", type=click.Path(exists=True, dir_okay=False),
              help="Many verdicts instead of one: a CSV with columns comparison, verdict and (optional) note.")
@gateway_options
@friendly_errors
def review(path, comparison, verdict, note, verdicts_file, url, admin_key, config_path) -> None:
    """Record your verdict on one of PATH's shadow or audit comparisons (COMPARISON: its id, from
    arbitrage route show PATH --disagreements N), or on each of a file's; the latest verdict on a
    comparison counts."""
    if verdicts_file:
        if comparison or verdict or note:
            raise click.UsageError("give COMPARISON, --verdict and --note, or --file, not both")
        verdicts = read_verdicts(verdicts_file)
    elif comparison and verdict:
        verdicts = [{"shadow_id": comparison, "verdict": verdict, **({"note": note} if note else {})}]
    else:
        raise click.UsageError("give COMPARISON and --verdict (or --file with many)")
    client, entry = _client(url, admin_key, config_path), {}
    for done, body in enumerate(verdicts):
        try:
            entry = client.call("POST", path, "review", json=body)
        except click.ClickException as exc:
            if len(verdicts) > 1:
                exc.message = f"{done} of {len(verdicts)} verdicts recorded; then {body['shadow_id']}: {exc.message}"
            raise
    what = f"comparison {comparison} reviewed {verdict}" if not verdicts_file else f"{len(verdicts)} verdicts recorded"
    status = entry.get("status") or {}
    click.echo(f"{path}: {what}; calibrated threshold now {_calibrated(status)}; "
               f"ramp evidence now {render_ramp_evidence(entry['policy'], status)}")


def read_verdicts(file: str) -> list[dict[str, str]]:
    """A verdicts CSV as request bodies, every line checked before any is sent."""
    import csv

    with open(file, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = {"comparison", "verdict"} - set(reader.fieldnames or [])
        if missing:
            raise click.UsageError(f"{file}: no {' or '.join(sorted(missing))} column (columns: comparison, "
                                   f"verdict, note)")
        verdicts = []
        for line, row in enumerate(reader, start=2):
            if row["verdict"] not in VERDICTS or not row["comparison"]:
                raise click.UsageError(f"{file} line {line}: a comparison id and a verdict of "
                                       f"{', '.join(VERDICTS)} (got {row['comparison']!r}, {row['verdict']!r})")
            verdicts.append({"shadow_id": row["comparison"], "verdict": row["verdict"],
                             **({"note": row["note"]} if row.get("note") else {})})
    if not verdicts:
        raise click.UsageError(f"{file} has no verdicts")
    return verdicts


def _params(reason: str | None) -> dict[str, str]:
    return {"reason": reason} if reason else {}


def summary(entry: dict[str, Any]) -> str:
    """One line: the path's policy now."""
    p = entry["policy"]
    adapter = f", adapter {p['adapter']}" if p["adapter"] else ""
    return (f"{entry['path']}: {p['mode']}, share {p['share']:g}%, threshold {p['threshold']:g}{adapter}, "
            f"comparator {p['comparator']['name']}")
