"""The gateway's OpenAPI document: the real request bodies, and the bearer key it needs.

The handlers read their bodies themselves (lenient decoding, one parse on the hot path),
so litestar cannot see the body types. Each proxied route names its wire struct with
``operation_class=json_body(Struct)``; the structs' JSON schemas (from msgspec) become
components of the document, which ``/openapi`` serves to any gateway key.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from litestar import Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, OpenAPIMediaType, Operation, Reference, RequestBody, SecurityScheme

from gateway.auth import require_client
from gateway.chat.protocol import ChatCompletionRequest
from gateway.completions.protocol import CompletionRequest
from gateway.embeddings.protocol import EmbeddingRequest

WIRE_TYPES = (ChatCompletionRequest, CompletionRequest, EmbeddingRequest)
REF = "#/components/schemas/{name}"
SECURITY_SCHEME = "gatewayKey"


def json_body(struct: type) -> type[Operation]:
    """An Operation class whose request body is ``struct`` as JSON (for ``operation_class=``)."""

    @dataclass
    class JSONBodyOperation(Operation):
        def __post_init__(self) -> None:
            schema = Reference(ref=REF.format(name=struct.__name__))
            self.request_body = RequestBody(content={"application/json": OpenAPIMediaType(schema=schema)},
                                            required=True)

    return JSONBodyOperation


def openapi_config() -> OpenAPIConfig:
    """The document at ``/openapi/openapi.json`` (and ``.yaml``), behind a gateway key."""
    _, schemas = msgspec.json.schema_components(WIRE_TYPES, ref_template=REF)
    components = Components(schemas=schemas, security_schemes={
        SECURITY_SCHEME: SecurityScheme(type="http", scheme="bearer", description="A gateway key (sk-arb-...).")})
    return OpenAPIConfig(title="arbitrage gateway", version="0.1.0", path="/openapi", components=components,
                         security=[{SECURITY_SCHEME: []}], render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
                         openapi_router=Router("/openapi", route_handlers=[], guards=[require_client]))
