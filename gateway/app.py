"""The litestar application: routes, error handlers, lifespan; served by uvicorn in one process
or in several worker processes."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State

from arbitrage.config import Config
from gateway.admin import ADMIN_ROUTES
from gateway.auth import require_metrics
from gateway.chat.routes import chat_completions
from gateway.completions.routes import completions
from gateway.embeddings.routes import embeddings
from gateway.errors import EXCEPTION_HANDLERS
from gateway.limits import SHARED_LIMITS_ENV, shared_limits_in
from gateway.metrics import multiprocess_metrics_folder
from gateway.models.routes import list_models, retrieve_model
from gateway.openapi import openapi_config
from gateway.ramp_evidence import SHARED_RAMP_ENV, shared_evidence_in
from gateway.service import Gateway

CONFIG_ENV = "ARBITRAGE_WORKER_CONFIG"
"""Carries the checked config (JSON, no secrets: keys are named by their variables) to the workers."""


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
        route_handlers=[chat_completions, completions, embeddings, list_models, retrieve_model, healthz, metrics,
                        *ADMIN_ROUTES],
        lifespan=[gateway.lifespan, gateway.quotas.lifespan],
        on_startup=[gateway.metrics.worker_started],
        on_shutdown=[gateway.metrics.worker_exiting],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.gateway.max_body_bytes,
        state=State({"gateway": gateway}),
        openapi_config=openapi_config(),
    )


def worker_app() -> Litestar:
    """The app of one worker process (uvicorn's factory); the config comes from ``serve``."""
    config = msgspec.json.decode(os.environ[CONFIG_ENV], type=Config)
    configure_logging(config.gateway.log_level)
    stop_with_supervisor(os.getppid())
    return create_app(config)


def stop_with_supervisor(supervisor: int) -> None:
    """A worker whose supervisor is gone (kill -9) shuts down gracefully (its journal sealed and
    compacted) instead of holding the port, so the gateway can be started again."""

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-supervisor", daemon=True).start()


def serve(config: Config) -> None:
    """Serve until stopped: in this process, or in ``gateway.workers`` processes sharing the port
    (uvicorn's supervisor restarts a worker that dies)."""
    import uvicorn

    from gateway.connection_limits import limited_protocol

    options = dict(host=config.gateway.host, port=config.gateway.port, loop="uvloop", http=limited_protocol(config.gateway),
                   access_log=False, log_level=config.gateway.log_level, timeout_graceful_shutdown=10)
    if config.gateway.workers == 1:
        uvicorn.run(create_app(config), **options)
        return
    os.environ[CONFIG_ENV] = msgspec.json.encode(config).decode()
    with multiprocess_metrics_folder() as folder:
        shared_limits_in(Path(folder), config.data_dir)  # one rpm and one budget per key for all workers
        shared_evidence_in(Path(folder), config)  # one ramp per path for all workers
        try:
            uvicorn.run(f"{__name__}:worker_app", factory=True, workers=config.gateway.workers, **options)
        finally:
            os.environ.pop(SHARED_LIMITS_ENV, None)
            os.environ.pop(SHARED_RAMP_ENV, None)


def configure_logging(level: str) -> None:
    """Log lines with time, level and logger, at the configured level."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is too much
