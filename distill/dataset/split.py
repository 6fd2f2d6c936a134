"""The deterministic train/eval split: a hash of the normalized input decides the side, so the
same input always lands on the same side, in every build and every version."""

from __future__ import annotations

import hashlib

from distill.dataset.filters import normalized_input
from distill.dataset.source import Example


def is_eval(example: Example, eval_fraction: float, seed: int = 0) -> bool:
    """True when the example's input hashes into the first ``eval_fraction`` of the range."""
    digest = hashlib.sha256(f"{seed}\0{normalized_input(example.input_messages)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split(examples: list[Example], eval_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, eval), each in the order given."""
    train, held_out = [], []
    for example in examples:
        (held_out if is_eval(example, eval_fraction, seed) else train).append(example)
    return train, held_out
