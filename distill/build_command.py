"""``arbitrage distill build PATH``: a versioned training set from a path's captured calls."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from arbitrage.cli_options import CONFIG_OPTION, DATA_DIR_OPTION, field_option, friendly_errors
from distill.dataset.config import EXPORT_FORMATS, BuildConfig

if TYPE_CHECKING:
    from distill.dataset.teacher import Progress

INTERRUPTED_EXIT = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def distill() -> None:
    """Distillation: turn a call path's captured traffic into a model you own."""


@distill.command("build")
@click.argument("path")
@CONFIG_OPTION
@DATA_DIR_OPTION
@field_option(BuildConfig, "--datasets-dir", field="datasets_dir", type=click.Path(file_okay=False))
@field_option(BuildConfig, "--relabel", field="relabel", is_flag=True)
@field_option(BuildConfig, "--teacher-model", field="teacher_model")
@field_option(BuildConfig, "--system-prompt-file", field="system_prompt_file", type=click.Path(dir_okay=False))
@field_option(BuildConfig, "--budget-usd", field="budget_usd", type=float)
@field_option(BuildConfig, "--concurrency", field="concurrency", type=int)
@field_option(BuildConfig, "--max-tokens", field="max_tokens", type=int)
@field_option(BuildConfig, "--temperature", field="temperature", type=float)
@field_option(BuildConfig, "--answer-format", field="answer_format", type=click.Choice(["json", "text"]))
@field_option(BuildConfig, "--json-schema", field="json_schema_file", type=click.Path(dir_okay=False))
@field_option(BuildConfig, "--near-duplicate-threshold", field="near_duplicate_threshold", type=float)
@field_option(BuildConfig, "--eval-fraction", field="eval_fraction", type=float)
@field_option(BuildConfig, "--seed", field="seed", type=int)
@field_option(BuildConfig, "--synthesize", field="synthesize", type=int, metavar="N")
@field_option(BuildConfig, "--synthesize-per-call", field="synthesize_per_call", type=int)
@field_option(BuildConfig, "--synthesize-shots", field="synthesize_shots", type=int)
@field_option(BuildConfig, "--synthesize-temperature", field="synthesize_temperature", type=float)
@field_option(BuildConfig, "--synthesize-max-tokens", field="synthesize_max_tokens", type=int)
@field_option(BuildConfig, "--synthesize-structured", field="synthesize_structured", is_flag=True)
@field_option(BuildConfig, "--max-examples", field="max_examples", type=int)
@field_option(BuildConfig, "--export", field="export", type=click.Choice(EXPORT_FORMATS), multiple=True)
@friendly_errors
def build(config_path, data_dir, **options) -> None:
    """Build the next version of PATH's training set: DATA_DIR/datasets/PATH/vN/ with train and
    eval Parquet and a manifest. Its folder is printed on stdout.

    Synthetic examples (--synthesize) are marked source=synthetic and go to the train split only,
    so evaluation stays on real traffic."""
    from arbitrage.config import load_config
    from distill.dataset.build import build as build_dataset

    command = command_line(click.get_current_context())
    try:
        config = load_config(config_path, data_dir=data_dir)
        cfg = BuildConfig(data_dir=str(config.data_dir), **options)
        result = build_dataset(cfg, config, command, progress_bar)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: no dataset was written; teacher answers received so far are cached, so "
                   "re-running the same command resumes without paying for them again", err=True)
        sys.exit(INTERRUPTED_EXIT)
    report(result.manifest, result.folder)


@contextlib.contextmanager
def progress_bar(description: str, total: int, budget_usd: float) -> Iterator[Progress]:
    """A progress bar on stderr with the dollars spent in this run against the budget."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(),
               TextColumn("${task.fields[spent]:.6f} of ${task.fields[budget]:g}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Bar(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, spent=0.0, budget=budget_usd)
        yield lambda done, spent: bar.update(task, completed=done, spent=spent)


def report(manifest: dict, folder) -> None:
    """Summary on stderr, the dataset's folder on stdout."""
    split, teacher = manifest["split"], manifest["teacher"]
    click.echo(f"dataset {manifest['path']} {manifest['version']}: {split['train']} train, {split['eval']} eval",
               err=True)
    click.echo("filters: " + ", ".join(f"{name} {n}" for name, n in manifest["filters"].items()), err=True)
    if teacher and manifest["config"]["relabel"]:
        report_teacher(teacher, manifest["dollars"], manifest["filters"])
    if manifest["synthesis"]:
        report_synthesis(manifest["synthesis"], manifest["dollars"])
    click.echo(str(folder))


def report_teacher(teacher: dict, dollars: dict, counts: dict) -> None:
    spent, cached = dollars["spent_this_run_usd"], dollars["cached_usd"]
    click.echo(f"teacher {teacher['model']}: {teacher['answers_paid']} answers paid (${spent:.6f}), "
               f"{teacher['answers_cached']} from the cache (${cached:.6f}, paid before)", err=True)
    if teacher["rejected"]:
        click.echo(f"the teacher rejected {teacher['rejected']} inputs (400/422), e.g.: {teacher['first_rejection']}",
                   err=True)
    if teacher["stopped_by_budget"]:
        click.echo(f"budget reached: ${spent:.6f} of ${dollars['budget_usd']:g} spent, and the next call could cost "
                   f"up to ${teacher['next_call_bound_usd']:.6f} (a smaller --max-tokens lowers that); "
                   f"{counts['not_relabelled_budget']} inputs were not relabelled and are not in this dataset: "
                   f"re-run with a larger --budget-usd to add them (cached answers are not paid again)", err=True)


def report_synthesis(synthesis: dict, dollars: dict) -> None:
    counts, paid = synthesis["counts"], synthesis["dollars"]
    click.echo(f"synthesis: {counts['kept']} of {counts['asked']} new inputs asked kept (train split only): "
               + ", ".join(f"{name} {n}" for name, n in counts.items()), err=True)
    click.echo(f"synthesis paid ${paid['generation_spent_usd']:.6f} for generation and "
               f"${paid['labelling_spent_usd']:.6f} for labels (cached, paid before: "
               f"${paid['generation_cached_usd'] + paid['labelling_cached_usd']:.6f})", err=True)
    if synthesis["first_rejection"]:
        click.echo(f"rejected generation output, e.g.: {synthesis['first_rejection']}", err=True)
    if synthesis["stopped_by_budget"]:
        click.echo(f"budget reached during synthesis: ${dollars['spent_this_run_usd']:.6f} of "
                   f"${dollars['budget_usd']:g} spent, and the next call could cost up to "
                   f"${synthesis['next_call_bound_usd']:.6f}; {counts['calls_not_made_budget']} generation calls "
                   f"and {counts['not_labelled_budget']} labels were not made: re-run with a larger --budget-usd "
                   f"to add them (cached calls are not paid again)", err=True)


def command_line(ctx: click.Context) -> list[str]:
    """The command as given (arguments, then the options set on the command line)."""
    words = ctx.command_path.split()
    given = [p for p in ctx.command.params if ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    for param in sorted(given, key=lambda p: not isinstance(p, click.Argument)):
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0])
        else:
            for item in value if getattr(param, "multiple", False) else (value,):
                words += [param.opts[0], str(item)]
    return words


if __name__ == "__main__":
    distill()
