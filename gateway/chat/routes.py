"""HTTP route of ``POST /v1/chat/completions``."""

from __future__ import annotations

from litestar import Request, Response, post

from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.serving import ChatStreamAssembler, template
from gateway.openapi import json_body
from gateway.service import Endpoint

CHAT = Endpoint("chat.completions", "/chat/completions", ChatCompletionRequest, template, ChatStreamAssembler)


@post("/v1/chat/completions", status_code=200, operation_class=json_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """Create a chat completion (OpenAI-compatible; streaming and not)."""
    return await request.app.state.gateway.handle(request, CHAT)
