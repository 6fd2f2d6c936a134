"""What the upstream receives: the client's request untouched, except what the gateway must change.

In-process gateway (litestar's test client) in front of a real local HTTP server that records
every request it gets, so the exact forwarded bytes and headers can be inspected.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class RecordingHandler(BaseHTTPRequestHandler):
    """Answers like OpenAI and keeps (body, headers) of every request on its server."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.received.append((body, {k.lower(): v for k, v in self.headers.items()}))
        if orjson.loads(body).get("stream"):
            self._reply(b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in CHUNKS) + b"data: [DONE]\n\n",
                        "text/event-stream")
        else:
            self._reply(orjson.dumps(COMPLETION), "application/json", {"x-ratelimit-remaining-requests": "99"})

    def _reply(self, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(200)
        for name, value in {"content-type": ctype, "content-length": str(len(body)), **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    server.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def client(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-secret")
    url = f"http://127.0.0.1:{upstream.server_address[1]}/v1"
    config = load_config(None, data_dir=str(tmp_path), dev=True, upstream_url=url)
    with TestClient(create_app(config)) as test_client:
        yield test_client


def test_unknown_fields_and_body_bytes_pass_untouched(client, upstream):
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"future_field":{"x":[1,2]}}'
    client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert upstream.received[0][0] == body


def test_gateway_key_is_replaced_by_the_upstream_key(client, upstream):
    client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []},
                headers={"Authorization": "Bearer sk-client-gateway-key", "X-Arbitrage-Path": "p"})
    sent = upstream.received[0][1]
    assert sent["authorization"] == "Bearer sk-upstream-secret" and "x-arbitrage-path" not in sent


def test_path_metadata_entry_is_removed_before_forwarding(client, upstream):
    client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [],
                                              "metadata": {"arbitrage_path": "p", "team": "a"}})
    assert orjson.loads(upstream.received[0][0])["metadata"] == {"team": "a"}


def test_stream_asks_upstream_for_usage_and_hides_it(client, upstream):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [], "stream": True})
    assert orjson.loads(upstream.received[0][0])["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in response.content and response.content.endswith(b"data: [DONE]\n\n")


def test_rate_limit_headers_are_relayed(client):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["x-arbitrage-request-id"]
