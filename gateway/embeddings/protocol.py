"""Wire types of ``POST /v1/embeddings`` (fields the gateway reads)."""

from __future__ import annotations

import msgspec


class EmbeddingRequest(msgspec.Struct):
    input: str | list
    model: str
    metadata: dict | None = None
