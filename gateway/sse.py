"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import orjson

DONE = b"[DONE]"


class EventSplitter:
    """Cuts an arbitrary byte stream into whole SSE events (without their blank-line end)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._pending + data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._pending = events.pop()
        return [e for e in events if e.strip()]

    def flush(self) -> list[bytes]:
        """At the end of the stream: the last event, if it lacked its closing blank line."""
        rest, self._pending = self._pending, b""
        return [rest.rstrip(b"\n")] if rest.strip() else []


def event_data(event: bytes) -> bytes | None:
    """The ``data`` field of one event (lines joined), or None for comment/keep-alive events."""
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def error_event(message: str, error_type: str, code: str) -> bytes:
    """An OpenAI-shaped error as an SSE event; clients raise it instead of ending cleanly."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ChunkAssembler:
    """Shared part of the stream assemblers: usage, the response head, choices by index."""

    HEAD_FIELDS = ("id", "created", "model", "system_fingerprint")

    def __init__(self) -> None:
        self.usage: dict | None = None
        self._head: dict = {}
        self._choices: dict[int, dict] = {}

    def _note_head(self, chunk: dict) -> None:
        if not self._head:
            self._head = {k: chunk.get(k) for k in self.HEAD_FIELDS}
