"""One dataset build, start to finish:

    captured calls of the path  ->  drop unsupported, exact and near duplicate inputs
    -> (--relabel) the teacher's answers, cached, under the budget
    -> drop refusals and answers failing the output check  ->  deterministic split
    -> (--synthesize) new inputs from the teacher, deduplicated, labelled, checked: train only
    -> train/eval Parquet (+ exports) and a manifest, renamed into place as ``vN``

Duplicates are removed before the teacher is asked, so none of them is paid for. Relabelling,
generation and labelling share one budget, one answer cache and one progress bar style.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shlex
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

from arbitrage.config import Config
from arbitrage.errors import ConfigError, UpstreamError
from arbitrage.pricing import PriceBook
from distill.dataset import filters, synthesize
from distill.dataset.cache import AnswerCache
from distill.dataset.config import BuildConfig
from distill.dataset.source import Example, read_captured
from distill.dataset.split import split
from distill.dataset.teacher import Budget, Progress, RelabelResult, Teacher, TeacherRun, find_upstream
from distill.dataset.writer import write_dataset

SPLIT_METHOD = "eval if sha256(f'{seed}\\0{normalized input}')[:8] / 2**64 < eval_fraction"
SYNTHETIC_SPLIT = "train only: synthetic inputs never enter the eval split, so evaluation stays on real traffic"

DOLLAR_DIGITS = 10

ProgressBar = Callable[[str, int, float], AbstractContextManager[Progress]]
"""Given (what is done, calls to make, budget in dollars), a context that yields the progress callback."""

T = TypeVar("T")


@dataclass
class BuildResult:
    """What a build wrote."""

    folder: Path
    manifest: dict[str, Any]


@dataclass
class Synthesis:
    """What ``--synthesize`` asked, got and kept, and what it cost."""

    plan: synthesize.Plan
    generation: TeacherRun
    generated: synthesize.Generated
    labelling: RelabelResult
    counts: dict[str, int]
    examples: list[Example] = field(default_factory=list)
    """Labelled synthetic examples that passed every filter (train split only)."""


def build(cfg: BuildConfig, config: Config, command: list[str],
          progress_bar: ProgressBar | None = None) -> BuildResult:
    """Build one dataset version of ``cfg.path``; user mistakes raise ConfigError before any call."""
    check = filters.OutputCheck(cfg.answer_format, filters.load_schema(cfg.json_schema_file)
                                if cfg.json_schema_file else None)
    teacher = make_teacher(cfg, config) if cfg.uses_teacher else None
    captured = read_captured(Path(cfg.data_dir), cfg.path)
    counts: dict[str, int] = {"captured_calls": captured.calls, "unsupported": captured.unsupported}
    examples = distinct_inputs(captured.examples, cfg, counts)
    plan = synthesize.plan(examples, cfg, teacher.model) if cfg.synthesize else None
    relabelled = synthesis = None
    with teacher_work(cfg, teacher, progress_bar) as work:
        if cfg.relabel:
            relabelled = relabel(work, examples, cfg)
            examples = relabelled.examples
            counts.update(not_relabelled_budget=relabelled.not_relabelled, teacher_rejected=relabelled.rejected)
        examples = checked_answers(examples, check, counts)
        if plan is not None:
            synthesis = synthesize_examples(work, plan, captured.examples, cfg, check)
    if not examples and not (synthesis and synthesis.examples):
        rejection = f"; the teacher said: {relabelled.first_rejection}" if relabelled and relabelled.rejected else ""
        raise ConfigError(f"no examples left for path {cfg.path!r} after the filters ({_counts_line(counts)})"
                          f"{rejection}")
    train, held_out = split(examples, cfg.eval_fraction, cfg.seed)
    train += synthesis.examples if synthesis else []
    counts["kept"] = len(examples)
    manifest = make_manifest(cfg, command, captured, counts, teacher, relabelled, synthesis, len(train), len(held_out))
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


class TeacherWork:
    """A build's teacher calls: one answer cache, one budget for every phase, a progress bar per phase."""

    def __init__(self, cfg: BuildConfig, teacher: Teacher, cache: AnswerCache,
                 progress_bar: ProgressBar | None) -> None:
        self.cfg, self.teacher, self.cache, self.progress_bar = cfg, teacher, cache, progress_bar
        self.budget = Budget(cfg.budget_usd)

    def run(self, description: str, total: int, work: Callable[[Progress | None], Awaitable[T]]) -> T:
        """Run one phase; a teacher failure says that a re-run resumes without paying twice."""
        bar = (self.progress_bar(description, total, self.budget.limit) if self.progress_bar
               else contextlib.nullcontext(None))
        try:
            with bar as progress:
                return asyncio.run(work(progress))
        except UpstreamError as exc:
            raise UpstreamError(f"{exc}; {len(self.cache.answers)} teacher answers are cached in {self.cache.path}: "
                                f"re-running the same command resumes without paying for them again") from None


@contextlib.contextmanager
def teacher_work(cfg: BuildConfig, teacher: Teacher | None, progress_bar: ProgressBar | None):
    """The build's ``TeacherWork`` with its cache open (None without a teacher)."""
    if teacher is None:
        yield None
        return
    cache = AnswerCache(cfg.datasets_root / "cache").open()
    try:
        yield TeacherWork(cfg, teacher, cache, progress_bar)
    finally:
        cache.close()


def relabel(work: TeacherWork, examples: list[Example], cfg: BuildConfig) -> RelabelResult:
    """The teacher's answers; stops cleanly at the budget, raises when it is too small for one call."""
    result = work.run("relabelling", len(examples), lambda progress: work.teacher.relabel(
        examples, work.cache, work.budget, cfg.concurrency, progress))
    if result.stopped_by_budget and not result.examples:
        raise ConfigError(f"--budget-usd {cfg.budget_usd} cannot pay for a single teacher call (the next one "
                          f"could cost up to ${result.next_call_bound_usd:.6f}; a smaller --max-tokens lowers that)")
    return result


def synthesize_examples(work: TeacherWork, plan: synthesize.Plan, existing: list[Example], cfg: BuildConfig,
                        check: filters.OutputCheck) -> Synthesis:
    """New inputs from the teacher, minus duplicates of ``existing`` and of each other, labelled and checked."""
    generation = work.run("generating inputs", len(plan.calls), lambda progress: work.teacher.run(
        plan.calls, work.cache, work.budget, cfg.concurrency, progress))
    if generation.stopped_by_budget and not generation.entries:
        raise ConfigError(f"--budget-usd {cfg.budget_usd} cannot pay for a single generation call "
                          f"(${work.budget.spent:.6f} spent before it in this run; the next call could cost up to "
                          f"${generation.next_call_bound_usd:.6f}; a smaller --synthesize-max-tokens lowers that); "
                          f"answers received are cached, so a re-run with a larger budget does not pay for them again")
    generated = synthesize.read_answers(plan, generation)
    fresh, exact, near = synthesize.drop_known(generated.examples, existing, cfg.near_duplicate_threshold)
    labelling = work.run("labelling new inputs", len(fresh), lambda progress: work.teacher.relabel(
        fresh, work.cache, work.budget, cfg.concurrency, progress)) if fresh else RelabelResult()
    counts = synthesis_counts(cfg, plan, generation, generated, exact, near, labelling)
    examples = checked_answers(labelling.examples, check, counts)
    counts["kept"] = len(examples)
    return Synthesis(plan, generation, generated, labelling, counts, examples)


def synthesis_counts(cfg: BuildConfig, plan: synthesize.Plan, generation: TeacherRun, generated: synthesize.Generated,
                     exact: int, near: int, labelling: RelabelResult) -> dict[str, int]:
    """From inputs asked for to inputs labelled, in pipeline order."""
    return {
        "asked": cfg.synthesize, "calls": len(plan.calls), "calls_paid": generation.paid,
        "calls_cached": generation.cached, "calls_not_made_budget": generation.not_asked,
        "calls_rejected_by_teacher": generation.rejected, "answers_without_array": generated.answers_without_array,
        "generated": len(generated.examples), "items_rejected": generated.items_rejected,
        "exact_duplicate": exact, "near_duplicate": near, "labelled": len(labelling.examples),
        "not_labelled_budget": labelling.not_relabelled, "label_rejected_by_teacher": labelling.rejected,
    }


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
                  relabelled: RelabelResult | None, synthesis: Synthesis | None, train: int,
                  held_out: int) -> dict[str, Any]:
    """What produced the dataset: sources, teacher, prompt, dollars, filters, split, config, command."""
    runs = [r for r in (relabelled, *((synthesis.generation, synthesis.labelling) if synthesis else ())) if r]
    spent, cached = sum(r.spent_usd for r in runs), sum(r.cached_usd for r in runs)
    return {
        "created_at": datetime.now(UTC).isoformat(), "path": cfg.path,
        "command": shlex.join(command), "arbitrage_version": _version(),
        "sources": {"data_dir": str(Path(cfg.data_dir).resolve()), "captured_calls": captured.calls,
                    "first_ts": captured.first_ts, "last_ts": captured.last_ts,
                    "answers": "relabel" if cfg.relabel else "captured",
                    "synthetic_examples": len(synthesis.examples) if synthesis else 0},
        "teacher": _teacher_facts(teacher, relabelled or RelabelResult()) if teacher else None,
        "dollars": {"budget_usd": cfg.budget_usd, "spent_this_run_usd": _dollars(spent),
                    "cached_usd": _dollars(cached), "total_usd": _dollars(spent + cached)},
        "filters": counts,
        "synthesis": _synthesis_facts(synthesis) if synthesis else None,
        "split": {"method": SPLIT_METHOD, "eval_fraction": cfg.eval_fraction, "seed": cfg.seed,
                  "train": train, "eval": held_out,
                  "synthetic_in_train": len(synthesis.examples) if synthesis else 0,
                  "synthetic": SYNTHETIC_SPLIT},
        "config": cfg.to_dict(),
    }


def _synthesis_facts(synthesis: Synthesis) -> dict[str, Any]:
    generation, labelling, plan = synthesis.generation, synthesis.labelling, synthesis.plan
    stopped = generation if generation.stopped_by_budget else labelling
    return {
        "split": SYNTHETIC_SPLIT, "counts": synthesis.counts,
        "first_rejection": synthesis.generated.first_rejection or generation.first_rejection,
        "generation": {"system_prompt": synthesize.GENERATION_PROMPT,
                       "system_prompt_sha256": hashlib.sha256(synthesize.GENERATION_PROMPT.encode()).hexdigest(),
                       "params": plan.params, "app_system_prompt": plan.app_prompt,
                       "item_length_limit": plan.length_limit},
        "dollars": {"generation_spent_usd": _dollars(generation.spent_usd),
                    "generation_cached_usd": _dollars(generation.cached_usd),
                    "labelling_spent_usd": _dollars(labelling.spent_usd),
                    "labelling_cached_usd": _dollars(labelling.cached_usd)},
        "stopped_by_budget": stopped.stopped_by_budget, "next_call_bound_usd": stopped.next_call_bound_usd,
    }


def _dollars(amount: float) -> float:
    return round(amount, DOLLAR_DIGITS)


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
