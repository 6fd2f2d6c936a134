"""The gateway's OpenAPI document: the real request bodies, and the bearer key it needs.

The handlers read their bodies themselves (lenient decoding, one parse on the hot path),
so litestar cannot see the body types. Each proxied route names its wire struct with
``operation_class=json_body(Struct)``, whose JSON schema (from msgspec) is written inline
(litestar rebuilds ``components/schemas`` from its own registry, so references to added
components would dangle). ``/openapi`` serves the document to any client or admin key.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from litestar import Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, OpenAPIMediaType, Operation, RequestBody, SecurityScheme

from gateway.auth import require_client

SECURITY_SCHEME = "gatewayKey"


def json_body(struct: type) -> type[Operation]:
    """An Operation class whose request body is ``struct`` as JSON (for ``operation_class=``)."""

    @dataclass
    class JSONBodyOperation(Operation):
        def __post_init__(self) -> None:
            schema = inline_schema(struct)
            self.request_body = RequestBody(content={"application/json": OpenAPIMediaType(schema=schema)},
                                            required=True)

    return JSONBodyOperation


def inline_schema(struct: type) -> dict:
    """The JSON schema of a msgspec type with every ``$ref`` replaced by what it names."""
    schema = msgspec.json.schema(struct)
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rpartition("/")[2]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


def openapi_config() -> OpenAPIConfig:
    """The document at ``/openapi/openapi.json`` (and ``.yaml``), behind a gateway key."""
    components = Components(security_schemes={
        SECURITY_SCHEME: SecurityScheme(type="http", scheme="bearer", description="A gateway key (sk-arb-...).")})
    return OpenAPIConfig(title="arbitrage gateway", version="0.1.0", path="/openapi", components=components,
                         security=[{SECURITY_SCHEME: []}], render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
                         openapi_router=Router("/openapi", route_handlers=[], guards=[require_client]))
