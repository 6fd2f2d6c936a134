"""``arbitrage distill eval PATH``: an adapter against its teacher, through a real vLLM."""

from __future__ import annotations

from pathlib import Path

import click

from arbitrage.cli_options import (
    CONFIG_OPTION,
    DATA_DIR_OPTION,
    field_option,
    friendly_errors,
)
from distill.build_command import command_line
from distill.evaluation import EvalConfig


@click.command("eval")
@click.argument("path")
@CONFIG_OPTION
@DATA_DIR_OPTION
@field_option(EvalConfig, "--adapter", field="adapter", metavar="vN")
@field_option(EvalConfig, "--target", field="target", type=float)
@field_option(EvalConfig, "--confidence", field="confidence", type=click.Choice(["joint", "min"]))
@field_option(EvalConfig, "--comparator", field="comparator", type=click.Choice(["exact", "json", "numeric", "similarity"]))
@field_option(EvalConfig, "--max-examples", field="max_examples", type=int)
@field_option(EvalConfig, "--max-tokens", field="max_tokens", type=int)
@field_option(EvalConfig, "--concurrency", field="concurrency", type=int)
@field_option(EvalConfig, "--min-samples", field="min_samples", type=int)
@field_option(EvalConfig, "--vllm-url", field="vllm_url", metavar="URL")
@friendly_errors
def evaluate(path, config_path, data_dir, **options) -> None:
    """Evaluate PATH's adapter on its eval split through vLLM: agreement with the teacher, and coverage
    against confidence threshold. Writes DATA_DIR/evals/PATH/ADAPTER/vN/ (predictions, the curve as
    Parquet and PNG, a manifest) and prints its folder on stdout."""
    from arbitrage.config import load_config
    from distill.evaluation import evaluate as run_eval

    config = load_config(config_path, data_dir=data_dir)
    cfg = EvalConfig(path=path, **options)
    result = run_eval(cfg, config, command_line(click.get_current_context()))
    report(result.manifest, result.folder)
    click.echo(str(result.folder))


def report(manifest: dict, folder: Path) -> None:
    """The numbers a person decides on, on stderr."""
    click.echo(f"{manifest['path']} {manifest['adapter']['version']}: {manifest['agreement']:.1%} agreement with the "
               f"teacher at full coverage ({manifest['examples']} eval examples, {manifest['comparator']} comparator, "
               f"{manifest['errors']} errors, {manifest['timing']['requests_per_s']} requests/s)", err=True)
    target = manifest["target"]
    reached = manifest["at_target"]
    click.echo(f"at {target:.1%} agreement: " + (
        f"threshold {reached['threshold']:.4f} serves {reached['coverage']:.1%} locally" if reached
        else "no threshold reaches it"), err=True)
    calibrated = manifest["calibrated"]
    click.echo("calibrated (Wilson lower bound at the target): " + (
        f"threshold {calibrated['threshold']:.4f}, {calibrated['coverage']:.1%} served" if calibrated
        else f"none yet (needs at least {manifest['config']['min_samples']} served answers above the bound)"),
        err=True)
    if manifest["disagreements"]:
        click.echo(f"{manifest['disagreements']} answers disagree with the teacher; the most confident first, with their "
                   f"inputs, in {folder / 'disagreements.parquet'} (the teacher's own mistakes show up there)", err=True)
