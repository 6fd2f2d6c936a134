"""HTTP route of ``POST /v1/embeddings``."""

from __future__ import annotations

from litestar import Request, Response, post

from gateway.embeddings.protocol import EmbeddingRequest
from gateway.openapi import json_body
from gateway.service import Endpoint

EMBEDDINGS = Endpoint("embeddings", "/embeddings", EmbeddingRequest, lambda _: "", None)


@post("/v1/embeddings", status_code=200, operation_class=json_body(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    """Create embeddings (OpenAI-compatible; never streamed)."""
    return await request.app.state.gateway.handle(request, EMBEDDINGS)
