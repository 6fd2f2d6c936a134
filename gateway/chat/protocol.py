"""Wire types of ``POST /v1/chat/completions`` (only the fields the gateway reads).

Lenient: unknown fields are allowed and forwarded untouched; only the types of
the fields below are checked.
"""

from __future__ import annotations

import msgspec


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ChatCompletionRequest(msgspec.Struct):
    messages: list[ChatMessage]
    model: str
    metadata: dict | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
