"""Completion-specific logic: stream assembly of ``text_completion`` chunks."""

from __future__ import annotations

from gateway.completions.protocol import CompletionRequest
from gateway.sse import ChunkAssembler


def template(_: CompletionRequest) -> str:
    """Legacy completions carry no system prompt: the path is (endpoint, model)."""
    return ""


class CompletionStreamAssembler(ChunkAssembler):
    """Rebuilds a ``text_completion`` object from its streamed chunks."""

    def add(self, chunk: dict) -> bool:
        """Take one chunk; True when it carried the first generated text."""
        self._note_head(chunk)
        first = False
        for c in chunk.get("choices") or ():
            choice = self._choices.setdefault(c.get("index", 0), {"text": [], "finish_reason": None})
            if c.get("text"):
                choice["text"].append(c["text"])
                first |= len(choice["text"]) == 1
            choice["finish_reason"] = c.get("finish_reason") or choice["finish_reason"]
        return first

    def result(self) -> dict:
        choices = [{"index": i, "text": "".join(c["text"]), "finish_reason": c["finish_reason"]}
                   for i, c in sorted(self._choices.items())]
        return {**self._head, "object": "text_completion", "choices": choices, "usage": self.usage}
