"""The floor of a Python proxy: a bare ASGI app under uvicorn that only forwards.

No framework, no auth, no path identity, no capture, no metrics: it reads the request body,
sends it to the upstream, and relays the answer. Measured beside the real gateway, it shows how
much of the gateway's cost is the server (uvicorn), how much the upstream client, and how much
everything the gateway does on top. Three upstream clients:

  httpx    one shared `httpx.AsyncClient` (what the gateway uses)
  aiohttp  one shared `aiohttp.ClientSession`
  raw      a minimal keep-alive HTTP/1.1 client on asyncio protocols (Content-Length bodies only)

It runs from bench/.work/floor-venv (see setup.sh: the gateway's versions of uvicorn, uvloop,
httptools and httpx, plus aiohttp).

    python bench/floor_proxy.py --client raw --port 18101 --upstream-url http://127.0.0.1:18100/v1
"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import urlsplit

JSON_HEADERS = [(b"content-type", b"application/json")]


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection that carries one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        total = end + 4 + content_length(head)
        if len(self.buffer) < total or self.waiter is None:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed the connection"))


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("the floor client reads Content-Length bodies only")


class RawClient:
    """A pool of idle keep-alive connections to one host; POST only."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port, self.prefix = parts.hostname, parts.port or 80, parts.path.rstrip("/")
        self.idle: list[UpstreamConnection] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        connection = self.idle.pop() if self.idle else await self._connect()
        connection.waiter = asyncio.get_running_loop().create_future()
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        connection.transport.write(head.encode() + body)
        status, content = await connection.waiter
        if not connection.closed:
            self.idle.append(connection)
        return status, content

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(UpstreamConnection, self.host, self.port)
        return connection

    async def aclose(self) -> None:
        for connection in self.idle:
            connection.transport.close()


class HttpxClient:
    """The same interface over one shared httpx.AsyncClient."""

    def __init__(self, base_url: str) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        response = await self.client.post(
            self.base_url + path, content=body, headers={"content-type": "application/json"}
        )
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self.client.aclose()


class AiohttpClient:
    """The same interface over one shared aiohttp.ClientSession."""

    def __init__(self, base_url: str) -> None:
        import aiohttp

        self.base_url = base_url.rstrip("/")
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"}
        async with self.session.post(self.base_url + path, data=body, headers=headers) as response:
            return response.status, await response.read()

    async def aclose(self) -> None:
        await self.session.close()


CLIENTS = {"httpx": HttpxClient, "aiohttp": AiohttpClient, "raw": RawClient}


def build_app(client_factory):
    """A bare ASGI app: `GET /healthz` and `POST /v1/...` forwarded upstream."""
    state = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["path"] == "/healthz":
            await respond(send, 200, b'{"status":"ok"}')
        else:
            body = await read_body(receive)
            status, content = await state["client"].post(scope["path"].removeprefix("/v1"), body)
            await respond(send, status, content)

    async def lifespan(receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["client"] = client_factory()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await state["client"].aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=sorted(CLIENTS), default="raw")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18101)
    parser.add_argument("--upstream-url", default="http://127.0.0.1:18100/v1")
    args = parser.parse_args()
    client_type = CLIENTS[args.client]
    app = build_app(lambda: client_type(args.upstream_url))
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
