"""The simulator's typed configuration; every field carries its help text (reused by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

BANKING77_TRAIN = Path(__file__).parent / "data" / "banking77" / "train.csv"


def _option(default: object, help_text: str) -> object:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True, kw_only=True, slots=True)
class SimulatorConfig:
    """How the simulated upstream answers: from which data set, how fast, with what seed."""

    dataset: Path = _option(BANKING77_TRAIN, "CSV file with a 'text' column and a label column "
                            "(default: the packaged Banking77 training set).")
    label_column: str | None = _option(None, "Label column of the data set; needed only when "
                                       "it has several columns besides 'text'.")
    answer_key: str = _option("intent", "JSON key of the answer: {\"<key>\": \"<label>\"}.")
    default_model: str = _option("gpt-4o-mini", "Model reported when the requested name is a "
                                 "failure mode without a real model (e.g. 'flaky-30').")
    latency_ms: float = _option(300.0, "Median latency before answering (log-normal; for "
                                "streams the time to first chunk); 0 turns it and the chunk delay off.")
    latency_sigma: float = _option(0.5, "Sigma of the log-normal latency (spread around the "
                                   "median).")
    token_ms: float = _option(20.0, "Delay between streamed chunks, in milliseconds.")
    slow_ms: float = _option(5000.0, "Extra delay added for the 'slow' model mode, in "
                             "milliseconds.")
    seed: int = _option(0, "Seed of the random draws (latency, 'flaky-N' failures).")

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_sigma", "token_ms", "slow_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.answer_key:
            raise ValueError("answer_key must not be empty")


def field_help(name: str) -> str:
    """The help text of one config field."""
    return next(item.metadata["help"] for item in fields(SimulatorConfig) if item.name == name)
