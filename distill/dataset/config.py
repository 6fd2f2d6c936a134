"""What one dataset build does: a dataclass whose fields carry their help text.

The command line takes its option help from here (``help_for``), the cross-field checks run
in ``__post_init__``, and the whole config is saved in the dataset's manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from arbitrage.documented_fields import DocumentedFields
from arbitrage.errors import ConfigError

EXPORT_FORMATS = ("openai-jsonl",)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class BuildConfig(DocumentedFields):
    """One ``arbitrage distill build`` run."""

    path: str = _help("The call path whose captured calls become the training set.")
    data_dir: str = _help("The capture store to read from.")
    datasets_dir: str | None = _help("Where datasets are written [default: DATA_DIR/datasets].", default=None)
    relabel: bool = _help("Replace the captured answers by a teacher's answers to the same inputs.",
                          default=False)
    teacher_model: str | None = _help(
        "Teacher model (served by an upstream of the config); needs --relabel or --synthesize.", default=None)
    system_prompt_file: str | None = _help(
        "File with the teacher's strict system prompt; it replaces the app's system prompt for the "
        "teacher only (the dataset keeps the app's).", default=None)
    budget_usd: float | None = _help(
        "Hard limit on dollars the teacher may cost in this run, relabelling, generation and labelling "
        "together (answers already cached are free); no call is started that could go over it.", default=None)
    concurrency: int = _help("Teacher calls in flight at once.", default=8)
    max_tokens: int = _help("Longest teacher answer (max_completion_tokens), in tokens.", default=512)
    temperature: float = _help("Teacher sampling temperature.", default=0.0)
    answer_format: Literal["json", "text"] = _help(
        "The path's output check: 'json' drops answers that are not one JSON value.", default="json")
    json_schema_file: str | None = _help("JSON schema every answer must match (implies 'json').", default=None)
    near_duplicate_threshold: float = _help(
        "Inputs whose character 5-gram Jaccard similarity to an earlier input reaches this are "
        "dropped as near duplicates (1.0: only same shingle sets).", default=0.8)
    eval_fraction: float = _help("Share of inputs put in the eval split (by a hash of the input).", default=0.1)
    seed: int = _help("Salt of the split hash and of the sample of inputs shown in generation calls: another "
                      "seed, another (still deterministic) split and sample.", default=0)
    synthesize: int | None = _help(
        "Ask the teacher for N new inputs in the style of the captured ones, then label them as --relabel "
        "does; near duplicates of existing inputs (and of each other) are dropped. Synthetic examples go to "
        "the train split only, never to eval, so evaluation stays on real traffic.", default=None)
    synthesize_per_call: int = _help("New inputs asked for in one generation call (as a JSON array).", default=5)
    synthesize_shots: int = _help(
        "Captured inputs shown as examples in each generation call (a deterministic sample, another per call).",
        default=5)
    synthesize_temperature: float = _help("Sampling temperature of generation calls (more than 0).", default=1.0)
    synthesize_max_tokens: int = _help("Longest generation answer (max_completion_tokens), in tokens.",
                                       default=1024)
    synthesize_structured: bool = _help(
        "Ask for the new inputs through the API's structured outputs (response_format json_schema "
        "{\"inputs\": [strings]}, in the subset every provider accepts); teachers that support it (OpenAI, "
        "vLLM) then always answer parseable JSON. Off: the prompt alone asks for a JSON array.", default=False)
    max_examples: int | None = _help("Use at most this many distinct inputs (the earliest captured).",
                                     default=None)
    export: tuple[str, ...] = _help("Also write the splits in these formats: openai-jsonl.", default=())

    def __post_init__(self) -> None:
        check_path_name(self.path)
        self._check_teacher_options()
        self._check_ranges()
        if self.json_schema_file and self.answer_format != "json":
            raise ConfigError("--json-schema checks JSON answers; it cannot be used with --answer-format text")
        unknown = set(self.export) - set(EXPORT_FORMATS)
        if unknown:
            raise ConfigError(f"unknown export format(s) {sorted(unknown)}; known: {', '.join(EXPORT_FORMATS)}")

    @property
    def uses_teacher(self) -> bool:
        """Relabelling or synthesis: the teacher is called."""
        return self.relabel or self.synthesize is not None

    def _check_teacher_options(self) -> None:
        if self.uses_teacher:
            missing = [flag for flag, value in (("--teacher-model", self.teacher_model),
                                                ("--system-prompt-file", self.system_prompt_file),
                                                ("--budget-usd", self.budget_usd)) if value is None]
            if missing:
                raise ConfigError(f"{'--relabel' if self.relabel else '--synthesize'} needs {', '.join(missing)}")
        elif self.teacher_model or self.system_prompt_file or self.budget_usd is not None:
            raise ConfigError("--teacher-model, --system-prompt-file and --budget-usd only apply with --relabel "
                              "or --synthesize")
        if self.budget_usd is not None and not self.budget_usd > 0:
            raise ConfigError(f"--budget-usd must be more than 0, got {self.budget_usd}")
        if self.synthesize is not None and self.synthesize < 1:
            raise ConfigError(f"--synthesize asks for N new inputs: N must be at least 1, got {self.synthesize}")

    def _check_ranges(self) -> None:
        checks = (
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.max_tokens >= 1, "--max-tokens must be at least 1"),
            (0 <= self.temperature <= 2, "--temperature must be between 0 and 2"),
            (0 <= self.eval_fraction < 1, "--eval-fraction must be at least 0 and less than 1"),
            (0 < self.near_duplicate_threshold <= 1, "--near-duplicate-threshold must be in (0, 1]"),
            (self.max_examples is None or self.max_examples >= 1, "--max-examples must be at least 1"),
            (self.synthesize_per_call >= 1, "--synthesize-per-call must be at least 1"),
            (self.synthesize_shots >= 1, "--synthesize-shots must be at least 1"),
            (self.synthesize_max_tokens >= 1, "--synthesize-max-tokens must be at least 1"),
            (0 < self.synthesize_temperature <= 2,
             ("--synthesize-temperature must be more than 0 (identical prompts would give identical inputs) "
              "and at most 2")),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def datasets_root(self) -> Path:
        """The folder holding this path's versions and its teacher cache."""
        root = Path(self.datasets_dir) if self.datasets_dir else Path(self.data_dir) / "datasets"
        return root / self.path

    def to_dict(self) -> dict[str, Any]:
        """The config as saved in the manifest."""
        return {**dataclasses.asdict(self), "export": list(self.export)}


def check_path_name(path: str) -> None:
    """A call path name becomes folders: no empty, absolute, '.' or '..' parts."""
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or any(p in (".", "..") for p in parts) or "\\" in path:
        raise ConfigError(f"{path!r} is not a usable call path name")
