"""Hostile input: schemathesis against the gateway's own OpenAPI document, hypothesis on the parsers.

The HTTP fuzz runs against a real gateway in front of the real simulator. A 5xx is a
failure when the gateway made it itself (a 500 ``server_error``, or any 5xx not in
OpenAI's error shape); 5xx relayed from the upstream (they carry the gateway's request
id) and 502/504 for an upstream that failed are the upstream's doing. Bounded for CI:
``FUZZ_EXAMPLES`` examples per operation (default 40; about half a minute here).
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import httpx
import msgspec
import orjson
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbitrage.errors import InvalidRequestError
from gateway.chat.protocol import ChatCompletionRequest
from gateway.completions.protocol import CompletionRequest
from gateway.embeddings.protocol import EmbeddingRequest
from gateway.proxy import REQUEST_ID_HEADER
from gateway.service import _decode
from gateway.sse import EventSplitter, event_data
from tests.conftest import UPSTREAM_KEY
from tests.processes import arbitrage, gateway

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CONFIG = """
[gateway]
max_body_bytes = 65536

[[upstreams]]
name = "sim"
base_url = "{sim}/v1"
timeout_s = 3
max_retries = 0
"""


@pytest.fixture(scope="module")
def fuzz_target(sim, tmp_path_factory):
    """(gateway process, admin key): an admin key reaches every endpoint, /metrics included."""
    tmp = tmp_path_factory.mktemp("fuzz")
    data_dir = tmp / "data"
    key = arbitrage("keys", "create", "fuzz", "--admin", "--data-dir", str(data_dir)).stdout.strip()
    config = tmp / "arbitrage.toml"
    config.write_text(CONFIG.format(sim=sim.url))
    process = gateway(tmp, data_dir, config=config, env={"OPENAI_API_KEY": UPSTREAM_KEY}).start()
    yield process, key
    process.stop()


@pytest.fixture(scope="module")
def operations(fuzz_target) -> dict:
    """The API operations of the gateway's own OpenAPI document, by label."""
    process, key = fuzz_target
    schema = schemathesis.openapi.from_url(process.url + "/openapi/openapi.json",
                                           headers={"Authorization": f"Bearer {key}"})
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def made_by_the_gateway(response) -> bool:
    return REQUEST_ID_HEADER not in response.headers


def check_no_gateway_5xx(case, process, key) -> None:
    response = case.call(base_url=process.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    if response.status_code < 500 or not made_by_the_gateway(response):
        return
    error = orjson.loads(response.content).get("error", {})
    assert response.status_code in (502, 504) and error.get("type", "").startswith("upstream"), \
        f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"


def test_the_document_describes_every_route_and_body(operations):
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "GET /v1/models",
            "GET /v1/models/{model}", "GET /metrics", "GET /healthz"} <= set(operations)
    assert operations["POST /v1/chat/completions"].body  # the request body is described, so it gets fuzzed


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_from_the_gateway_itself(operations, fuzz_target, mode):
    process, key = fuzz_target
    for operation in operations.values():
        if mode is GenerationMode.POSITIVE and operation.path == "/v1/models/{model}":
            continue  # its {model:path} parameter is documented as format "uri": see test_any_model_name
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            check_no_gateway_5xx(case, process, key)

        fuzz()


@given(model=st.text(min_size=1, max_size=40))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_model_name_in_the_path(fuzz_target, model):
    process, key = fuzz_target
    response = httpx.get(f"{process.url}/v1/models/{quote(model, safe='')}", headers={"Authorization": f"Bearer {key}"},
                         timeout=10)
    assert response.status_code < 500 or not made_by_the_gateway(response) or response.status_code in (502, 504)


def test_gateway_survived_the_fuzz(fuzz_target):
    process, key = fuzz_target
    assert process.proc.poll() is None
    assert b"Traceback" not in process.log.read_bytes()


# --- the body parsers -------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
REQUEST_TYPES = (ChatCompletionRequest, CompletionRequest, EmbeddingRequest)


def decodes_or_refuses(body: bytes, request_type: type) -> None:
    try:
        parsed = _decode(body, request_type)
    except InvalidRequestError as exc:
        assert exc.status_code == 400 and exc.code in ("empty_body", "invalid_json", "invalid_type")
        return
    assert isinstance(parsed, request_type) and isinstance(parsed.model, str)


@pytest.mark.parametrize("request_type", REQUEST_TYPES)
@given(body=st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_decode_or_get_a_400(request_type, body):
    decodes_or_refuses(body, request_type)


@pytest.mark.parametrize("request_type", REQUEST_TYPES)
@given(value=JSON | st.fixed_dictionaries({"model": JSON, "messages": JSON, "input": JSON, "prompt": JSON,
                                             "stream": JSON, "stream_options": JSON, "metadata": JSON}))
@settings(max_examples=300, deadline=None)
def test_any_json_decodes_or_gets_a_400(request_type, value):
    decodes_or_refuses(json.dumps(value).encode(), request_type)  # json, not orjson: integers past 64 bits too


TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # lone surrogates are not text: they get a 400
VALID_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                          | TEXT, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                          max_leaves=20)


@given(body=st.fixed_dictionaries({"model": TEXT, "messages": st.lists(st.fixed_dictionaries(
    {"role": TEXT, "content": TEXT | st.none()}), max_size=3)}, optional={"extra": VALID_JSON}))
@settings(max_examples=200, deadline=None)
def test_well_typed_chat_requests_always_decode(body):
    parsed = msgspec.json.decode(json.dumps(body).encode(), type=ChatCompletionRequest)
    assert parsed.model == body["model"] and len(parsed.messages) == len(body["messages"])


EVENT_TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), min_size=1, max_size=40)


@given(events=st.lists(EVENT_TEXT.map(lambda t: b"data: " + t.encode()), max_size=8), cuts=st.lists(st.integers(0, 400)))
@settings(max_examples=300, deadline=None)
def test_events_survive_any_chunking(events, cuts):
    stream = b"".join(e + b"\n\n" for e in events)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    splitter, seen = EventSplitter(), []
    for start, end in zip(bounds, bounds[1:]):
        seen += splitter.feed(stream[start:end])
    seen += splitter.flush()
    assert seen == [e for e in events if e.strip()]


@given(pieces=st.lists(st.binary(max_size=64), max_size=10))
@settings(max_examples=300, deadline=None)
def test_splitter_and_event_data_never_fail_on_any_bytes(pieces):
    splitter = EventSplitter()
    events = [e for p in pieces for e in splitter.feed(p)] + splitter.flush()
    for event in events:
        data = event_data(event)
        assert data is None or isinstance(data, bytes)
