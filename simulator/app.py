"""HTTP routes of the simulator (the logic lives in ``serving``)."""

from __future__ import annotations

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from simulator.config import SimulatorConfig
from simulator.dataset import LabelledDataset
from simulator.errors import SimulatorError, handle_http_exception, handle_simulator_error
from simulator.protocol import model_object, parse_json_object
from simulator.serving import Simulator


def _simulator(request: Request) -> Simulator:
    return request.app.state.simulator


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, streamed or not."""
    body = parse_json_object(await request.body())
    return await _simulator(request).chat(body, request)


@post("/v1/completions", status_code=200)
async def completions(request: Request) -> Response:
    """OpenAI legacy text completions, streamed or not."""
    body = parse_json_object(await request.body())
    return await _simulator(request).completion(body, request)


@post("/v1/embeddings", status_code=200)
async def embeddings(request: Request) -> Response:
    """OpenAI embeddings."""
    body = parse_json_object(await request.body())
    return await _simulator(request).embeddings(body, request)


@get("/v1/models")
async def models(request: Request) -> Response:
    """The models this upstream offers."""
    return _simulator(request).models()


@get("/v1/models/{model_id:str}")
async def model(model_id: FromPath[str]) -> dict:
    """One model: any name is accepted, as every name is answered."""
    return model_object(model_id)


def create_app(config: SimulatorConfig | None = None) -> Litestar:
    """The simulator as a litestar app; the data set is loaded and indexed here, once
    (raises ``DatasetError`` for a missing file or unusable columns)."""
    config = config or SimulatorConfig()
    dataset = LabelledDataset.from_csv(config.dataset, config.label_column)
    app = Litestar(
        route_handlers=[chat_completions, completions, embeddings, models, model],
        exception_handlers={SimulatorError: handle_simulator_error,
                            HTTPException: handle_http_exception},
        openapi_config=None,
        logging_config=None,  # leave the host process's logging alone
    )
    app.state.simulator = Simulator(config, dataset)
    return app
