"""Access, secrets, redaction and slow or oversized clients, against a real gateway process.

The upstream here echoes the last user message back, so a test can see exactly what
the upstream received while the capture store holds the redacted text.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.testing import TestClient

from arbitrage.keys import KeyLimits, KeyStore
from gateway.auth import Authenticator, require_admin
from gateway.errors import EXCEPTION_HANDLERS
from tests.processes import arbitrage, gateway

UPSTREAM_KEY = "sk-echo-upstream-credential-never-stored"
WRONG_KEY = "sk-arb-presented-but-wrong-must-not-be-logged"
PII = "mail jane.doe@example.com or call +1 415 555 0100, card 4242 4242 4242 4242"
CONFIG = """
[gateway]
max_header_bytes = 8192
header_timeout_s = 1.0

[capture]
redact = true

[[upstreams]]
name = "echo"
base_url = "{upstream}/v1"
"""


class EchoUpstream(BaseHTTPRequestHandler):
    """An OpenAI-shaped upstream whose answer is the last user message it received."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        text = body["messages"][-1]["content"] if "messages" in body else "ok"
        self._send({"id": "chatcmpl-echo", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "echo"}]})

    def _send(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def secure(echo, tmp_path_factory):
    """A gateway with client keys alice and bob, an admin key and a metrics key; redaction on."""
    tmp = tmp_path_factory.mktemp("secure")
    data_dir = tmp / "data"
    roles = {"alice": "client", "bob": "client", "admin": "admin", "prometheus": "metrics"}
    keys = {name: arbitrage("keys", "create", name, "--role", role, "--data-dir", str(data_dir)).stdout.strip()
            for name, role in roles.items()}
    config = tmp / "arbitrage.toml"
    config.write_text(CONFIG.format(upstream=echo))
    process = gateway(tmp, data_dir, config=config, env={"OPENAI_API_KEY": UPSTREAM_KEY}).start()
    yield process, data_dir, keys
    process.stop()


def call(process, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, process.url + path, headers=headers, timeout=10, **kwargs)


def chat(process, key: str, text: str) -> httpx.Response:
    return call(process, "POST", "/v1/chat/completions", key,
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})


def every_endpoint(process, admin_key: str) -> list[tuple[str, str]]:
    """(method, path) of every route in the gateway's own OpenAPI document, plus the document's."""
    doc = call(process, "GET", "/openapi/openapi.json", admin_key).json()
    routes = [(m.upper(), p.replace("{model}", "gpt-4o-mini")) for p, item in doc["paths"].items() for m in item]
    return routes + [("GET", "/openapi/openapi.json"), ("GET", "/openapi/openapi.yaml"), ("GET", "/openapi")]


def test_every_endpoint_but_health_needs_a_key(secure):
    process, _, keys = secure
    routes = every_endpoint(process, keys["admin"])
    assert ("GET", "/metrics") in routes and len(routes) >= 9
    for method, path in routes:
        expected = 200 if path == "/healthz" else 401
        assert call(process, method, path).status_code == expected, (method, path)
        if path != "/healthz":
            assert call(process, method, path, WRONG_KEY).status_code == 401, (method, path)


@pytest.mark.parametrize("who,status", [("alice", 403), ("prometheus", 200), ("admin", 200)])
def test_metrics_need_a_metrics_or_admin_key(secure, who, status):
    process, _, keys = secure
    response = call(process, "GET", "/metrics", keys[who])
    assert response.status_code == status
    if status == 403:
        assert response.json()["error"]["code"] == "insufficient_role"


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/openapi/openapi.json")])
def test_a_metrics_key_cannot_spend_or_read_the_api(secure, method, path):
    process, _, keys = secure
    assert call(process, method, path, keys["prometheus"], json={"model": "gpt-4o-mini"}).status_code == 403


def test_a_client_key_reads_nothing_of_another_key(secure):
    process, _, keys = secure
    marker = "alice-private-marker-7731"
    assert chat(process, keys["alice"], marker).status_code == 200
    for method, path in every_endpoint(process, keys["admin"]):
        response = call(process, method, path, keys["bob"], json={"model": "gpt-4o-mini", "messages": []})
        assert marker not in response.text and keys["alice"] not in response.text, (method, path)


def guarded_app(keys: KeyStore) -> Litestar:
    @get("/admin/policy", guards=[require_admin])
    async def policy() -> dict:
        return {"ok": True}

    gateway = type("Gateway", (), {"auth": Authenticator(keys, dev=False)})()
    return Litestar([policy], state=State({"gateway": gateway}), exception_handlers=EXCEPTION_HANDLERS)


@pytest.mark.parametrize("role,status", [(None, 401), ("client", 403), ("metrics", 403), ("admin", 200)])
def test_require_admin_guards_admin_routes(tmp_path, role, status):
    keys = KeyStore(tmp_path)
    _, secret = keys.create("k", KeyLimits(role=role or "client"))
    with TestClient(guarded_app(keys)) as client:
        response = client.get("/admin/policy", headers={"Authorization": f"Bearer {secret}"} if role else {})
    assert response.status_code == status
    assert status == 200 or set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_upstream_gets_the_real_text_and_the_store_the_redacted(secure):
    process, data_dir, keys = secure
    response = chat(process, keys["alice"], PII)
    assert response.json()["choices"][0]["message"]["content"] == PII  # the echo saw the real text
    request_id = response.headers["x-arbitrage-request-id"]
    [row] = json.loads(arbitrage("sql", f"SELECT request, response FROM calls WHERE request_id = '{request_id}'",
                                 "--json", "--data-dir", str(data_dir)).stdout)
    for column in ("request", "response"):
        assert "[EMAIL]" in row[column] and "[PHONE]" in row[column] and "[CARD]" in row[column]
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert b"jane.doe@example.com" not in stored and b"4242 4242 4242 4242" not in stored


def test_no_key_or_credential_in_data_logs_or_metrics(secure):
    process, data_dir, keys = secure
    chat(process, keys["alice"], "hello")
    chat(process, WRONG_KEY, "hello")
    call(process, "GET", "/metrics", keys["alice"])
    metrics = call(process, "GET", "/metrics", keys["prometheus"]).text
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    haystacks = [p.read_bytes() for p in files] + [process.log.read_bytes(), metrics.encode()]
    for secret in [*keys.values(), UPSTREAM_KEY, WRONG_KEY]:
        assert not any(secret.encode() in h for h in haystacks), secret[:12]
        assert not any(secret.removeprefix("sk-arb-").encode() in h for h in haystacks), secret[:12]


def raw_connection(process) -> socket.socket:
    return socket.create_connection(("127.0.0.1", process.port), timeout=5)


def test_slow_loris_is_cut_off_and_others_are_served(secure):
    process, _, _ = secure
    started, sock = time.monotonic(), raw_connection(process)
    sock.settimeout(0.2)
    answer = b""
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            sock.send(bytes([byte]))
            answer = sock.recv(200)
        except (socket.timeout, TimeoutError):
            assert call(process, "GET", "/healthz").status_code == 200  # not blocked by the slow client
            continue
        except OSError:
            break
        if answer or time.monotonic() - started > 5:
            break
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3


def test_silent_connection_is_closed(secure):
    process, _, _ = secure
    sock = raw_connection(process)
    assert sock.recv(200).startswith(b"HTTP/1.1 408")
    assert sock.recv(200) == b""


@pytest.mark.parametrize("headers,status", [
    ({"X-Big": "a" * 9000}, 431),
    ({f"X-Many-{i}": "b" * 100 for i in range(100)}, 431),
    ({f"X-Some-{i}": "b" * 100 for i in range(20)}, 200),
])
def test_header_size_limit(secure, headers, status):
    process, _, _ = secure
    try:
        response = httpx.get(process.url + "/healthz", headers=headers, timeout=5)
    except httpx.RemoteProtocolError:  # the server may close before the client finished sending
        assert status == 431
        return
    assert response.status_code == status


def test_keep_alive_connection_survives_past_the_head_timeout(secure):
    process, _, _ = secure
    with httpx.Client(base_url=process.url, timeout=5) as client:
        assert client.get("/healthz").status_code == 200
        time.sleep(1.5)  # idle longer than header_timeout_s: only uvicorn's keep-alive timeout (5 s) applies
        assert client.get("/healthz").status_code == 200
