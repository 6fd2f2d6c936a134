"""Chat-specific logic: the prompt template of a request, and stream assembly."""

from __future__ import annotations

from gateway.chat.protocol import ChatCompletionRequest
from gateway.sse import ChunkAssembler


def text_of(content: str | list | None) -> str:
    """The text of a message content (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def template(request: ChatCompletionRequest) -> str:
    """The system (or developer) prompt: what identifies the app's prompt template."""
    return next((text_of(m.content) for m in request.messages if m.role in ("system", "developer")), "")


class ChatStreamAssembler(ChunkAssembler):
    """Rebuilds a ``chat.completion`` object from ``chat.completion.chunk`` events."""

    def add(self, chunk: dict) -> bool:
        """Take one chunk; True when it carried the first generated content or tool call."""
        self._note_head(chunk)
        first_content = False
        for delta_choice in chunk.get("choices") or ():
            choice = self._choices.setdefault(delta_choice.get("index", 0), {"role": None, "content": [], "tools": {}})
            first_content |= self._merge(choice, delta_choice)
        return first_content

    def _merge(self, choice: dict, delta_choice: dict) -> bool:
        delta = delta_choice.get("delta") or {}
        choice["role"] = choice["role"] or delta.get("role")
        if delta_choice.get("finish_reason"):
            choice["finish_reason"] = delta_choice["finish_reason"]
        for call in delta.get("tool_calls") or ():
            slot = choice["tools"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                      "function": {"name": "", "arguments": ""}})
            slot["id"] = slot["id"] or call.get("id")
            fn = call.get("function") or {}
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""
        if delta.get("content"):
            choice["content"].append(delta["content"])
            return len(choice["content"]) == 1
        return bool(delta.get("tool_calls"))

    def result(self) -> dict:
        choices = []
        for index, c in sorted(self._choices.items()):
            message = {"role": c["role"] or "assistant", "content": "".join(c["content"]) or None}
            if c["tools"]:
                message["tool_calls"] = [c["tools"][i] for i in sorted(c["tools"])]
            choices.append({"index": index, "message": message, "finish_reason": c.get("finish_reason")})
        return {**self._head, "object": "chat.completion", "choices": choices, "usage": self.usage}
