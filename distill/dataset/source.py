"""Captured examples of one call path, read from the ``calls`` view of the capture store.

A usable call is a successful (200, no error) chat completion that an upstream answered (a
local model's answers are not training material). Its *input* is the request's messages
without the system prompt, each reduced to role and text; the system prompt is kept beside it.
Calls with tools, tool calls or non-text content are counted as unsupported and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbitrage.capture.store import connect, retrying
from arbitrage.errors import ConfigError

SYSTEM_ROLES = ("system", "developer")
TEXT_ROLES = ("user", "assistant")

_QUERY = """
    SELECT request_id, ts, request, response, response_model, cost_usd FROM calls
    WHERE path = ? AND endpoint = 'chat.completions' AND status_code = 200 AND error_type IS NULL
      AND coalesce(served_by, 'upstream') <> 'local'
    ORDER BY ts, request_id
"""


@dataclass(frozen=True)
class Example:
    """One input with its answer (captured, or later the teacher's)."""

    request_id: str | None
    """The captured call's id (None for a synthetic input)."""
    input_messages: tuple[dict[str, str], ...]
    """The conversation without the system prompt: ``{"role", "content"}`` text messages."""
    system_prompt: str | None
    answer: str
    refused: bool = False
    """The answer came as OpenAI's ``refusal`` rather than content."""
    finish_reason: str | None = None
    answer_model: str | None = None
    cost_usd: float | None = None
    source: str = "captured"
    """Where the input came from and who answered: captured, relabel or synthetic."""
    answer_key: str | None = None
    """The teacher cache key of a relabelled answer."""


@dataclass
class CapturedSet:
    """What the store held for the path."""

    examples: list[Example]
    calls: int
    """Successful chat completions of the path, usable or not."""
    unsupported: int
    first_ts: str | None
    last_ts: str | None


def read_captured(data_dir: Path, path: str) -> CapturedSet:
    """Every usable captured example of ``path``, oldest first; a clear error when there is none."""
    con = connect(data_dir)
    try:
        rows = retrying(lambda: con.execute(_QUERY, [path]).fetchall())
        if not rows:
            known = retrying(lambda: _known_paths(con))
            raise ConfigError(f"no captured chat completions for path {path!r} in {data_dir}{known}")
    finally:
        con.close()
    examples = [ex for ex in (to_example(*row) for row in rows) if ex is not None]
    first, last = (ts.isoformat() if ts is not None else None for ts in (rows[0][1], rows[-1][1]))
    return CapturedSet(examples, len(rows), len(rows) - len(examples), first, last)


def _known_paths(con) -> str:
    rows = con.execute("SELECT path, count(*) AS n FROM calls WHERE endpoint = 'chat.completions' "
                       "AND status_code = 200 GROUP BY path ORDER BY n DESC, path LIMIT 10").fetchall()
    return f" (paths with captured calls: {', '.join(f'{p} ({n})' for p, n in rows)})" if rows else ""


def to_example(request_id: str, ts: Any, request: str | None, response: str | None,
               response_model: str | None, cost_usd: float | None) -> Example | None:
    """One call as an example, or None when it is not a plain text conversation."""
    body, reply = _json_object(request), _json_object(response)
    if body is None or reply is None or body.get("tools") or body.get("functions"):
        return None
    message = _first_message(reply)
    split = split_messages(body.get("messages"))
    if message is None or split is None or message.get("tool_calls") or message.get("function_call"):
        return None
    refusal, content = message.get("refusal"), message.get("content")
    if not isinstance(content, str) and not refusal:
        return None
    system_prompt, messages = split
    return Example(request_id, messages, system_prompt, content if isinstance(content, str) else str(refusal),
                   refused=bool(refusal), finish_reason=reply["choices"][0].get("finish_reason"),
                   answer_model=response_model, cost_usd=cost_usd)


def split_messages(messages: Any) -> tuple[str | None, tuple[dict[str, str], ...]] | None:
    """(system prompt, the other messages as role + text), or None for unsupported content."""
    if not isinstance(messages, list) or not messages:
        return None
    system, rest = [], []
    for message in messages:
        text = message_text(message.get("content")) if isinstance(message, dict) else None
        role = message.get("role") if isinstance(message, dict) else None
        if text is None or role not in SYSTEM_ROLES + TEXT_ROLES or message.get("tool_calls"):
            return None
        (system if role in SYSTEM_ROLES else rest).append({"role": role, "content": text})
    if not rest:
        return None
    return ("\n\n".join(m["content"] for m in system) if system else None), tuple(rest)


def message_text(content: Any) -> str | None:
    """A message's text: a string, or a list of text parts; None for images, audio and files."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def _first_message(reply: dict) -> dict | None:
    choices = reply.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        return message if isinstance(message, dict) else None
    return None


def _json_object(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
