"""HTTP route of ``GET /v1/models``: the models of every upstream, merged."""

from __future__ import annotations

from litestar import Request, Response, get


@get("/v1/models")
async def list_models(request: Request) -> Response:
    """List the models the configured upstreams serve."""
    return await request.app.state.gateway.list_models(request)
