"""One dataset build, start to finish:

    captured calls of the path  ->  drop unsupported, exact and near duplicate inputs
    -> (--relabel) the teacher's answers, cached, under the budget
    -> drop refusals and answers failing the output check  ->  deterministic split
    -> train/eval Parquet (+ exports) and a manifest, renamed into place as ``vN``

Duplicates are removed before the teacher is asked, so none of them is paid for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, ContextManager

from arbitrage.config import Config
from arbitrage.errors import ConfigError, UpstreamError
from arbitrage.pricing import PriceBook
from distill.dataset import filters
from distill.dataset.cache import AnswerCache
from distill.dataset.config import BuildConfig
from distill.dataset.source import Example, read_captured
from distill.dataset.split import split
from distill.dataset.teacher import Budget, Progress, RelabelResult, Teacher, find_upstream
from distill.dataset.writer import write_dataset

SPLIT_METHOD = "eval if sha256(f'{seed}\\0{normalized input}')[:8] / 2**64 < eval_fraction"

DOLLAR_DIGITS = 10

ProgressBar = Callable[[int, float], ContextManager[Progress]]
"""Given (inputs to answer, budget in dollars), a context that yields the progress callback."""


@dataclass
class BuildResult:
    """What a build wrote."""

    folder: Path
    manifest: dict[str, Any]


def build(cfg: BuildConfig, config: Config, command: list[str],
          progress_bar: ProgressBar | None = None) -> BuildResult:
    """Build one dataset version of ``cfg.path``; user mistakes raise ConfigError before any call."""
    check = filters.OutputCheck(cfg.answer_format, filters.load_schema(cfg.json_schema_file)
                                if cfg.json_schema_file else None)
    teacher = make_teacher(cfg, config) if cfg.relabel else None
    captured = read_captured(Path(cfg.data_dir), cfg.path)
    counts: dict[str, int] = {"captured_calls": captured.calls, "unsupported": captured.unsupported}
    examples = distinct_inputs(captured.examples, cfg, counts)
    relabelled = None
    if teacher is not None:
        relabelled = relabel(teacher, examples, cfg, progress_bar)
        examples = relabelled.examples
        counts.update(not_relabelled_budget=relabelled.not_relabelled, teacher_rejected=relabelled.rejected)
    examples = checked_answers(examples, check, counts)
    if not examples:
        rejection = f"; the teacher said: {relabelled.first_rejection}" if relabelled and relabelled.rejected else ""
        raise ConfigError(f"no examples left for path {cfg.path!r} after the filters ({_counts_line(counts)})"
                          f"{rejection}")
    train, held_out = split(examples, cfg.eval_fraction, cfg.seed)
    counts["kept"] = len(examples)
    manifest = make_manifest(cfg, command, captured, counts, teacher, relabelled, len(train), len(held_out))
    folder = write_dataset(cfg.datasets_root, {"train": train, "eval": held_out}, manifest, cfg.export)
    return BuildResult(folder, {"version": folder.name, **manifest})


def make_teacher(cfg: BuildConfig, config: Config) -> Teacher:
    """The teacher the options name, checked: served, priced, with a readable, non-empty prompt."""
    try:
        prompt = Path(cfg.system_prompt_file).read_text()
    except FileNotFoundError:
        raise ConfigError(f"system prompt file not found: {cfg.system_prompt_file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read system prompt file {cfg.system_prompt_file}: {exc}") from None
    if not prompt.strip():
        raise ConfigError(f"system prompt file {cfg.system_prompt_file} is empty")
    params = {"temperature": cfg.temperature, "max_completion_tokens": cfg.max_tokens}
    return Teacher(find_upstream(config, cfg.teacher_model), cfg.teacher_model, prompt, params,
                   PriceBook(config.prices))


def distinct_inputs(examples: list[Example], cfg: BuildConfig, counts: dict[str, int]) -> list[Example]:
    """Drop exact and near duplicate inputs (the earliest is kept), then cap the count."""
    examples, counts["exact_duplicate"] = filters.drop_exact_duplicates(examples)
    examples, counts["near_duplicate"] = filters.drop_near_duplicates(examples, cfg.near_duplicate_threshold)
    limit = cfg.max_examples or len(examples)
    counts["over_max_examples"] = max(0, len(examples) - limit)
    return examples[:limit]


def relabel(teacher: Teacher, examples: list[Example], cfg: BuildConfig,
            progress_bar: ProgressBar | None) -> RelabelResult:
    """The teacher's answers; stops cleanly at the budget, raises when it is too small for one call."""
    cache = AnswerCache(cfg.datasets_root / "cache").open()
    bar = progress_bar(len(examples), cfg.budget_usd) if progress_bar else contextlib.nullcontext(None)
    try:
        with bar as progress:
            result = asyncio.run(teacher.relabel(examples, cache, Budget(cfg.budget_usd), cfg.concurrency, progress))
    except UpstreamError as exc:
        raise UpstreamError(f"{exc}; {len(cache.answers)} teacher answers are cached in {cache.path}: "
                            f"re-running the same command resumes without paying for them again") from None
    finally:
        cache.close()
    if result.stopped_by_budget and not result.examples:
        raise ConfigError(f"--budget-usd {cfg.budget_usd} cannot pay for a single teacher call (the next one "
                          f"could cost up to ${result.next_call_bound_usd:.6f}; a smaller --max-tokens lowers that)")
    return result


def checked_answers(examples: list[Example], check: filters.OutputCheck, counts: dict[str, int]) -> list[Example]:
    """Drop refusals, answers cut off at the token limit, then answers failing the output check; counts each."""
    kept: list[Example] = []
    for name in ("refusal", "truncated", "invalid_json", "schema_mismatch"):
        counts[name] = 0
    for example in examples:
        problem = ("refusal" if filters.is_refusal(example) else "truncated" if filters.is_truncated(example)
                   else check.problem(example.answer))
        if problem:
            counts[problem] += 1
        else:
            kept.append(example)
    return kept


def make_manifest(cfg: BuildConfig, command: list[str], captured, counts: dict[str, int], teacher: Teacher | None,
                  relabelled: RelabelResult | None, train: int, held_out: int) -> dict[str, Any]:
    """What produced the dataset: sources, teacher, prompt, dollars, filters, split, config, command."""
    spent = relabelled.spent_usd if relabelled else 0.0
    cached = relabelled.cached_usd if relabelled else 0.0
    return {
        "created_at": datetime.now(UTC).isoformat(), "path": cfg.path,
        "command": shlex.join(command), "arbitrage_version": _version(),
        "sources": {"data_dir": str(Path(cfg.data_dir).resolve()), "captured_calls": captured.calls,
                    "first_ts": captured.first_ts, "last_ts": captured.last_ts,
                    "answers": "relabel" if teacher else "captured"},
        "teacher": _teacher_facts(teacher, relabelled) if teacher else None,
        "dollars": {"budget_usd": cfg.budget_usd, "spent_this_run_usd": round(spent, DOLLAR_DIGITS),
                    "cached_usd": round(cached, DOLLAR_DIGITS), "total_usd": round(spent + cached, DOLLAR_DIGITS)},
        "filters": counts,
        "split": {"method": SPLIT_METHOD, "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                  "train": train, "eval": held_out},
        "config": cfg.to_dict(),
    }


def _teacher_facts(teacher: Teacher, result: RelabelResult) -> dict[str, Any]:
    return {
        "model": teacher.model, "upstream": teacher.upstream.name, "base_url": teacher.upstream.base_url,
        "params": teacher.params, "system_prompt": teacher.system_prompt,
        "system_prompt_sha256": hashlib.sha256(teacher.system_prompt.encode()).hexdigest(),
        "answers_paid": result.paid, "answers_cached": result.cached, "rejected": result.rejected,
        "first_rejection": result.first_rejection, "stopped_by_budget": result.stopped_by_budget,
        "next_call_bound_usd": result.next_call_bound_usd,
    }


def _counts_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def _version() -> str:
    try:
        return version("arbitrage")
    except PackageNotFoundError:
        return "unknown"
