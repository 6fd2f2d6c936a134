"""Token counts and OpenAI's ``usage`` objects.

Counts are a deterministic approximation of a tokenizer: words and single punctuation marks,
plus a few tokens of framing per chat message, as OpenAI's chat format adds.
"""

from __future__ import annotations

import re
from typing import Any

TOKENS_PER_MESSAGE = 3
REPLY_PRIMING_TOKENS = 3
PROMPT_CACHE_LIMIT = 10_000
_PIECE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Approximate token count of a text."""
    return len(_PIECE.findall(text))


def content_text(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content
                         if isinstance(part, dict) and part.get("type") == "text"
                         and isinstance(part.get("text"), str))
    return ""


def message_tokens(message: dict[str, Any]) -> int:
    """Tokens one chat message costs, framing included."""
    return TOKENS_PER_MESSAGE + count_tokens(content_text(message.get("content")))


def chat_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Tokens of a whole chat prompt."""
    return REPLY_PRIMING_TOKENS + sum(message_tokens(message) for message in messages)


class PromptCache:
    """Remembers system prompts, so a repeated one is reported as cached (prompt caching)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def cached_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of the first system/developer message if it was seen before, else 0."""
        system = next((message for message in messages
                       if message.get("role") in ("system", "developer")), None)
        if system is None:
            return 0
        key = hash(content_text(system.get("content")))
        if key in self._seen:
            return message_tokens(system)
        if len(self._seen) >= PROMPT_CACHE_LIMIT:
            self._seen.clear()
        self._seen.add(key)
        return 0


def chat_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """The ``usage`` object of a chat completion."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def completion_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The ``usage`` object of a legacy text completion."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
