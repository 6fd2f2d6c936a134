"""A minimal, very fast OpenAI-compatible upstream for the proxy-overhead benchmark.

Answers `POST /v1/chat/completions` (non-streaming) with one fixed `chat.completion`
and `GET /v1/models` with one model, over HTTP/1.1 keep-alive on loopback. It is a raw
asyncio protocol (uvloop when installed) with a hand-rolled parser, so that it costs far
less per request than any proxy put in front of it: it is the common floor of the benchmark,
not a realistic upstream (see `simulator/` for that).

    python bench/stub_upstream.py --port 18000
"""

from __future__ import annotations

import argparse
import asyncio
import json

COMPLETION = {
    "id": "chatcmpl-bench0000000000000000000000",
    "object": "chat.completion",
    "created": 1764000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": '{"intent": "card_arrival"}', "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 32, "completion_tokens": 8, "total_tokens": 40},
    "system_fingerprint": "fp_bench",
}
MODELS = {
    "object": "list",
    "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1764000000, "owned_by": "bench"}],
}
HEADER_END = b"\r\n\r\n"


def http_response(status: str, body: bytes, keep_alive: bool = True) -> bytes:
    """Serialize one complete HTTP/1.1 response with a JSON body."""
    connection = b"keep-alive" if keep_alive else b"close"
    head = (
        b"HTTP/1.1 " + status.encode() + b"\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: " + connection + b"\r\n\r\n"
    )
    return head + body


def json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


ROUTES = {
    (b"POST", b"/v1/chat/completions"): http_response("200 OK", json_bytes(COMPLETION)),
    (b"GET", b"/v1/models"): http_response("200 OK", json_bytes(MODELS)),
    (b"GET", b"/healthz"): http_response("200 OK", b'{"status":"ok"}'),
}
NOT_FOUND = http_response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
BAD_REQUEST = http_response("400 Bad Request", b'{"error":{"message":"bad request"}}', keep_alive=False)


class Head:
    """What the stub needs from a request head: route key, body length, keep-alive."""

    __slots__ = ("route", "body_length", "keep_alive", "chunked")

    def __init__(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        method, _, rest = lines[0].partition(b" ")
        target, _, version = rest.partition(b" ")
        self.route = (method, target.partition(b"?")[0])
        self.body_length = 0
        self.keep_alive = version != b"HTTP/1.0"
        self.chunked = False
        for line in lines[1:]:
            self._header(line)

    def _header(self, line: bytes) -> None:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            self.body_length = int(value)
        elif name == b"connection":
            self.keep_alive = value.strip().lower() != b"close"
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()


class StubProtocol(asyncio.Protocol):
    """One connection: parse pipelined requests from a buffer, answer each from `ROUTES`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        out = []
        while self.buffer:
            answer = self._next_answer()
            if answer is None:
                break
            out.append(answer)
            if answer is BAD_REQUEST or not self._keep_alive:
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _next_answer(self) -> bytes | None:
        """Consume one complete request from the buffer; None while it is incomplete."""
        end = self.buffer.find(HEADER_END)
        if end < 0:
            return BAD_REQUEST if len(self.buffer) > 65536 else None
        try:
            head = Head(self.buffer[:end])
        except ValueError:
            return BAD_REQUEST
        if head.chunked:
            return BAD_REQUEST
        total = end + len(HEADER_END) + head.body_length
        if len(self.buffer) < total:
            return None
        self.buffer = self.buffer[total:]
        self._keep_alive = head.keep_alive
        return ROUTES.get(head.route, NOT_FOUND)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, the standard one otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StubProtocol, host, port, backlog=1024, reuse_address=True)
    print(f"stub upstream listening on http://{host}:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18000)
    args = parser.parse_args()
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()


if __name__ == "__main__":
    main()
