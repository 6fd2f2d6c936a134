"""HTTP route of ``GET /v1/models``: the models of every upstream, merged."""

from __future__ import annotations

from litestar import Request, Response, get


@get("/v1/models")
async def list_models(request: Request) -> Response:
    """List the models the configured upstreams serve."""
    return await request.app.state.gateway.list_models(request)


@get("/v1/models/{model:path}")
async def retrieve_model(request: Request) -> Response:
    """Describe one model, as the upstream that serves it does."""
    return await request.app.state.gateway.retrieve_model(request, str(request.path_params["model"]).lstrip("/"))
