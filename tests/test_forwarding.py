"""What the upstream receives: the client's request untouched, except what the gateway must change.

In-process (litestar's test client) with an ``httpx.MockTransport`` standing in for the upstream,
so the exact forwarded bytes and headers can be inspected.
"""

from __future__ import annotations

import httpx
import orjson
import pytest
from litestar.testing import TestClient

from arbitrage.config import load_config
from gateway.app import create_app

COMPLETION = {"id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
CHUNKS = [{"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
           "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]},
          {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [],
           "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}]


class RecordingUpstream:
    """Answers like OpenAI and keeps every request it got."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if orjson.loads(request.content).get("stream"):
            body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in CHUNKS) + b"data: [DONE]\n\n"
            return httpx.Response(200, stream=httpx.ByteStream(body), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=COMPLETION, headers={"x-ratelimit-remaining-requests": "99"})


@pytest.fixture
def upstream():
    return RecordingUpstream()


@pytest.fixture
def client(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-secret")
    config = load_config(None, data_dir=str(tmp_path), dev=True, upstream_url="http://upstream.test/v1")
    with TestClient(create_app(config, transport=httpx.MockTransport(upstream))) as test_client:
        yield test_client


def test_unknown_fields_and_body_bytes_pass_untouched(client, upstream):
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"future_field":{"x":[1,2]}}'
    client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert upstream.requests[0].content == body


def test_gateway_key_is_replaced_by_the_upstream_key(client, upstream):
    client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []},
                headers={"Authorization": "Bearer sk-client-gateway-key", "X-Arbitrage-Path": "p"})
    sent = upstream.requests[0].headers
    assert sent["authorization"] == "Bearer sk-upstream-secret" and "x-arbitrage-path" not in sent


def test_path_metadata_entry_is_removed_before_forwarding(client, upstream):
    client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [],
                                              "metadata": {"arbitrage_path": "p", "team": "a"}})
    assert orjson.loads(upstream.requests[0].content)["metadata"] == {"team": "a"}


def test_stream_asks_upstream_for_usage_and_hides_it(client, upstream):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [], "stream": True})
    assert orjson.loads(upstream.requests[0].content)["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in response.content and response.content.endswith(b"data: [DONE]\n\n")


def test_rate_limit_headers_are_relayed(client):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["x-arbitrage-request-id"]
