"""Server-sent events as OpenAI streams them, paced like generated tokens, and the deliberate
mid-answer aborts of the ``cutoff`` mode.

All events of an answer are encoded up front (an answer is a handful of chunks); only the
pacing happens while streaming.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from simulator.pacing import Pacing
from simulator.protocol import ReplyHeader, chat_delta_choice, chunk_base, text_delta_choice

DONE_EVENT = b"data: [DONE]\n\n"
_STREAM_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]+|\s+")


class DeliberateDisconnect(Exception):
    """Raised inside a response body to abort the connection (the ``cutoff`` mode)."""


def split_into_pieces(content: str) -> list[str]:
    """Token-like pieces (a word, or a run of punctuation) that join back into ``content``."""
    return _STREAM_PIECE.findall(content)


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass(frozen=True, slots=True)
class EventStream:
    """An answer as events: ``head`` at once, each ``body`` event after a chunk delay, then
    ``tail`` (finish chunks, usage, ``[DONE]``) at once."""

    head: bytes
    body: list[bytes]
    tail: bytes

    async def events(self, pacing: Pacing, cut_off: bool = False) -> AsyncIterator[bytes]:
        """The paced events; with ``cut_off``, about half of the body, then an abort."""
        if self.head:
            yield self.head
        body = self.body[: max(1, len(self.body) // 2)] if cut_off else self.body
        for event in body:
            await pacing.between_chunks()
            yield event
        if cut_off:
            raise DeliberateDisconnect("cutoff mode: connection aborted mid-stream")
        yield self.tail


async def truncated(body: bytes) -> AsyncIterator[bytes]:
    """The first half of a body, then an abort (non-streaming ``cutoff``)."""
    yield body[: len(body) // 2]
    raise DeliberateDisconnect("cutoff mode: connection aborted mid-body")


class ChunkWriter:
    """Encodes the chunks of one streamed answer; with ``include_usage`` every chunk carries
    ``"usage": null`` and a last chunk with no choices carries the usage, as OpenAI does."""

    def __init__(self, header: ReplyHeader, object_name: str, include_usage: bool) -> None:
        self._base = chunk_base(header, object_name)
        self._include_usage = include_usage

    def chunk(self, choices: list[dict[str, Any]]) -> bytes:
        """One chunk with these choices."""
        payload = {**self._base, "choices": choices}
        if self._include_usage:
            payload["usage"] = None
        return sse_event(payload)

    def tail(self, finish_choices: list[dict[str, Any]], usage: dict[str, Any]) -> bytes:
        """The finish chunk, the usage chunk when asked for, and ``[DONE]``."""
        tail = self.chunk(finish_choices)
        if self._include_usage:
            tail += sse_event({**self._base, "choices": [], "usage": usage})
        return tail + DONE_EVENT


def chat_event_stream(header: ReplyHeader, contents: list[str], usage: dict[str, Any],
                      include_usage: bool) -> EventStream:
    """A chat answer as ``chat.completion.chunk`` events: role, content pieces, finish."""
    writer = ChunkWriter(header, "chat.completion.chunk", include_usage)
    indexes = range(len(contents))
    head = b"".join(writer.chunk([chat_delta_choice(
        index, {"role": "assistant", "content": "", "refusal": None})]) for index in indexes)
    body = [writer.chunk([chat_delta_choice(index, {"content": piece})])
            for index, content in enumerate(contents) for piece in split_into_pieces(content)]
    tail = writer.tail([chat_delta_choice(index, {}, "stop") for index in indexes], usage)
    return EventStream(head, body, tail)


def text_event_stream(header: ReplyHeader, contents: list[str], usage: dict[str, Any],
                      include_usage: bool) -> EventStream:
    """A legacy completion as ``text_completion`` events: text pieces, then finish."""
    writer = ChunkWriter(header, "text_completion", include_usage)
    body = [writer.chunk([text_delta_choice(index, piece)])
            for index, content in enumerate(contents) for piece in split_into_pieces(content)]
    tail = writer.tail([text_delta_choice(index, "", "stop") for index in range(len(contents))],
                       usage)
    return EventStream(b"", body, tail)
