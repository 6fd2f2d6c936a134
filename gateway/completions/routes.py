"""HTTP route of ``POST /v1/completions``."""

from __future__ import annotations

from litestar import Request, Response, post

from gateway.completions.protocol import CompletionRequest
from gateway.completions.serving import CompletionStreamAssembler, template
from gateway.openapi import json_body
from gateway.service import Endpoint

COMPLETIONS = Endpoint("completions", "/completions", CompletionRequest, template, CompletionStreamAssembler)


@post("/v1/completions", status_code=200, operation_class=json_body(CompletionRequest))
async def completions(request: Request) -> Response:
    """Create a text completion (OpenAI-compatible legacy endpoint; streaming and not)."""
    return await request.app.state.gateway.handle(request, COMPLETIONS)
