"""Wire types of ``POST /v1/completions`` (legacy text completions; fields the gateway reads)."""

from __future__ import annotations

import msgspec

from gateway.chat.protocol import StreamOptions


class CompletionRequest(msgspec.Struct):
    model: str
    prompt: str | list | None = None
    metadata: dict | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
