"""The litestar application: routes, error handlers, lifespan."""

from __future__ import annotations

from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State

from arbitrage.config import Config
from gateway.auth import require_metrics
from gateway.chat.routes import chat_completions
from gateway.completions.routes import completions
from gateway.embeddings.routes import embeddings
from gateway.errors import EXCEPTION_HANDLERS
from gateway.models.routes import list_models, retrieve_model
from gateway.openapi import openapi_config
from gateway.service import Gateway


@get("/healthz", media_type=MediaType.JSON)
async def healthz() -> dict:
    """Liveness: the process is up and serving."""
    return {"status": "ok"}


@get("/metrics", media_type="text/plain; version=0.0.4; charset=utf-8", guards=[require_metrics])
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format (a ``metrics`` or ``admin`` key as the bearer)."""
    return Response(request.app.state.gateway.metrics.exposition(), media_type="text/plain; version=0.0.4")


def create_app(config: Config) -> Litestar:
    """The gateway app for one configuration."""
    gateway = Gateway(config)
    return Litestar(
        route_handlers=[chat_completions, completions, embeddings, list_models, retrieve_model, healthz, metrics],
        lifespan=[gateway.lifespan, gateway.quotas.lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.gateway.max_body_bytes,
        state=State({"gateway": gateway}),
        openapi_config=openapi_config(),
    )
