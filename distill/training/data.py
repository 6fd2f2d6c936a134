"""A dataset version's train and eval Parquet as token ids and labels for causal-LM training.

Each example is the conversation rendered with the base model's chat template up to the
assistant's turn (exactly the prompt a server builds with ``add_generation_prompt``), followed
by the answer's tokens and the template's end-of-turn token. Labels are -100 on the prompt, so
the loss falls on the answer and the end-of-turn token only: the model learns to answer and to
stop, not to reproduce the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from arbitrage.errors import ConfigError
from distill.training.config import TrainConfig

IGNORE_INDEX = -100
_SENTINEL = "\u2063ANSWER\u2063"


@dataclass
class EncodedSplit:
    """One split, ready for the Trainer."""

    examples: list[dict[str, list[int]]]
    """``input_ids``, ``attention_mask`` and ``labels`` of each example that fits."""
    too_long: int = 0
    """Examples left out because prompt + answer exceeded ``max_seq_len`` tokens."""
    tokens: int = 0
    """Tokens in the kept examples."""
    answer_tokens: int = 0
    """Of those, the tokens the loss is computed on."""
    lengths: list[int] = field(default_factory=list)

    def facts(self) -> dict[str, int]:
        return {"examples": len(self.examples), "too_long": self.too_long, "tokens": self.tokens,
                "answer_tokens": self.answer_tokens, "longest": max(self.lengths, default=0)}


def read_split(dataset_folder: Path, split: str) -> list[dict[str, Any]]:
    """The rows of ``train.parquet`` or ``eval.parquet`` (the dataset writer's schema)."""
    path = dataset_folder / f"{split}.parquet"
    if not path.is_file():
        raise ConfigError(f"dataset {dataset_folder} has no {path.name}")
    return pq.read_table(path, columns=["example_id", "input_messages", "system_prompt", "answer"]).to_pylist()


def system_prompt(row: dict[str, Any], cfg: TrainConfig) -> str | None:
    """The system prompt trained with: the path's own, or the short one when it is dropped."""
    return cfg.short_system_prompt if cfg.drop_system_prompt else row["system_prompt"]


def conversation(row: dict[str, Any], cfg: TrainConfig) -> list[dict[str, str]]:
    """The messages before the answer: system prompt (if any) and the input conversation."""
    system = system_prompt(row, cfg)
    head = [{"role": "system", "content": system}] if system else []
    return head + json.loads(row["input_messages"])


class ChatEncoder:
    """Token ids and labels of (messages, answer) under one tokenizer's chat template."""

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the base model's tokenizer has no chat template: an instruction-tuned base is needed")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.end_of_turn = self._end_of_turn_ids()

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text a server renders for these messages (``add_generation_prompt``)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: list[dict[str, str]], answer: str) -> dict[str, list[int]]:
        """``input_ids``, ``attention_mask`` and ``labels`` (the prompt masked with -100)."""
        prompt = self._ids(self.render_prompt(messages))
        target = self._ids(answer) + self.end_of_turn
        return {"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
                "labels": [IGNORE_INDEX] * len(prompt) + target}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _end_of_turn_ids(self) -> list[int]:
        """The tokens the template puts right after an assistant answer, up to its first special token."""
        messages = [{"role": "user", "content": "hi"}]
        prompt = self.render_prompt(messages)
        full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _SENTINEL}],
                                                  tokenize=False)
        if not full.startswith(prompt + _SENTINEL):
            raise ConfigError("the base model's chat template renders an assistant answer differently from its "
                              "generation prompt, so the answer tokens cannot be told apart")
        ids = self._ids(full[len(prompt) + len(_SENTINEL):])
        special = set(self.tokenizer.all_special_ids)
        stop = next((i for i, token in enumerate(ids) if token in special), None)
        return ids[:stop + 1] if stop is not None else [self.tokenizer.eos_token_id]


def encode_split(rows: list[dict[str, Any]], encoder: ChatEncoder, cfg: TrainConfig) -> EncodedSplit:
    """Every row that fits in ``max_seq_len`` tokens, encoded; the others counted."""
    split = EncodedSplit([])
    for row in rows:
        example = encoder.encode(conversation(row, cfg), row["answer"])
        length = len(example["input_ids"])
        if length > cfg.max_seq_len:
            split.too_long += 1
            continue
        split.examples.append(example)
        split.lengths.append(length)
        split.tokens += length
        split.answer_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
    return split
