"""Filters: duplicate inputs (before any teacher call, so none is paid for) and answers that
fail the path's output check or are refusals.

- Exact duplicates: the same normalized input (case-folded, whitespace collapsed, per role).
- Near duplicates: MinHash LSH over character 5-gram shingles of the normalized input (letters,
  digits and spaces only), each candidate confirmed by its exact Jaccard similarity. The index
  looks for candidates 0.2 below the threshold: at the threshold itself it missed a third of
  the true pairs. On the Banking77 training texts at 0.8 this drops 151 of 9,999 (1.5 %:
  "i'm still waiting for my card." vs "i am still waiting for my card."), in about 1.3 s.
- Refusals: OpenAI's ``refusal`` field, or an answer that *starts* with one of
  ``REFUSAL_OPENINGS`` (a JSON answer never does, so a support reply saying "sorry, I can't
  refund that" inside a JSON field is kept).
- Truncated: the answer stopped at the token limit (``finish_reason == "length"``).
- Output check: one JSON value (``answer_format="json"``), matching a JSON schema if given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arbitrage.errors import ConfigError
from distill.dataset.source import Example

SHINGLE_CHARS = 5
NUM_PERM = 128
CANDIDATE_MARGIN = 0.2
REFUSAL_OPENINGS = (
    "i'm sorry, but i can", "i am sorry, but i can", "i'm sorry, i can", "sorry, but i can", "sorry, i can",
    "i can't help", "i cannot help", "i can't assist", "i cannot assist", "i can't comply", "i cannot comply",
    "i'm unable to", "i am unable to", "i'm not able to", "i won't be able to", "as an ai language model",
)
_NOT_WORD = re.compile(r"[^\w ]+")


def normalized_input(messages: Sequence[dict[str, str]]) -> str:
    """The identity of an input: roles and case-folded, whitespace-collapsed texts."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].casefold().split())}" for m in messages)


def drop_exact_duplicates(examples: list[Example]) -> tuple[list[Example], int]:
    """Keep the first example of each normalized input."""
    seen: dict[str, Example] = {}
    for example in examples:
        seen.setdefault(normalized_input(example.input_messages), example)
    return list(seen.values()), len(examples) - len(seen)


def drop_near_duplicates(examples: list[Example], threshold: float) -> tuple[list[Example], int]:
    """Keep an example unless an earlier kept one is at least ``threshold`` similar (Jaccard)."""
    from datasketch import MinHash, MinHashLSH  # numpy and scipy: only when building

    shingle_sets = [shingles(normalized_input(e.input_messages)) for e in examples]
    hashes = MinHash.bulk([[s.encode() for s in sh] for sh in shingle_sets], num_perm=NUM_PERM)
    candidate_threshold = min(0.9, max(0.1, threshold - CANDIDATE_MARGIN))
    index, kept = MinHashLSH(threshold=candidate_threshold, num_perm=NUM_PERM), []
    for i, (example, minhash) in enumerate(zip(examples, hashes, strict=True)):
        if not any(jaccard(shingle_sets[i], shingle_sets[j]) >= threshold for j in index.query(minhash)):
            index.insert(i, minhash)
            kept.append(example)
    return kept, len(examples) - len(kept)


def shingles(text: str) -> set[str]:
    """Character 5-grams of the text's letters, digits and spaces (the whole text if shorter)."""
    text = _NOT_WORD.sub("", text)
    return {text[i:i + SHINGLE_CHARS] for i in range(max(1, len(text) - SHINGLE_CHARS + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def is_refusal(example: Example) -> bool:
    """OpenAI's refusal field, or an answer opening like a refusal."""
    opening = example.answer.lstrip(" \t\n\"'").casefold().replace("\u2019", "'")
    return example.refused or opening.startswith(REFUSAL_OPENINGS)


def is_truncated(example: Example) -> bool:
    """The answer was cut off at the token limit: never an ideal answer, even if it parses."""
    return example.finish_reason == "length"


class OutputCheck:
    """The path's output check; ``problem()`` names the filter an answer fails, if any."""

    def __init__(self, answer_format: str, schema: dict | None = None) -> None:
        self.answer_format = answer_format
        self._validator = None
        if schema is not None:
            from jsonschema import validators

            self._validator = validators.validator_for(schema)(schema)

    def problem(self, answer: str) -> str | None:
        """None for a good answer, else ``"invalid_json"`` or ``"schema_mismatch"``."""
        if self.answer_format != "json":
            return None
        try:
            value = json.loads(answer)
        except ValueError:
            return "invalid_json"
        if self._validator is not None and not self._validator.is_valid(value):
            return "schema_mismatch"
        return None


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read and check a JSON schema file; any problem is a one-line ConfigError."""
    from jsonschema import SchemaError, validators

    try:
        schema = json.loads(Path(path).read_text())
        if not isinstance(schema, (dict, bool)):
            raise SchemaError("a schema is an object or a boolean")
        validators.validator_for(schema).check_schema(schema)
    except FileNotFoundError:
        raise ConfigError(f"JSON schema file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read JSON schema {path}: {exc}") from None
    except SchemaError as exc:
        raise ConfigError(f"{path} is not a valid JSON schema: {exc.message}") from None
    return schema
