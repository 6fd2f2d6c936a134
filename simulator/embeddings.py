"""Deterministic pseudo-embeddings: the same text always gets the same unit vector."""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct


def pseudo_embedding(text: str, dimensions: int) -> list[float]:
    """A unit-length vector seeded by a hash of the text. Shorter vectors are the normalized
    prefix of longer ones, like OpenAI's ``dimensions`` shortening."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    draws = random.Random(seed)
    vector = [draws.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(math.fsum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def as_base64(vector: list[float]) -> str:
    """The vector as OpenAI's ``base64`` encoding: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
