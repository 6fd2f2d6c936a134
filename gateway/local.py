"""The local model server as the gateway sees it: health, the adapters the routes need kept
loaded, and chat completions with log-probs.

A background loop (``watch``) checks vLLM's health every second and compares the adapters it
serves with the ones the routing policies need; an adapter missing (a vLLM that restarted, a
newly promoted adapter) is loaded again. Until both are true, requests of that path go upstream
(the router's ``local_ok``), so a vLLM restart costs no client an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson

from arbitrage.config import LocalSettings
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


class LocalError(Exception):
    """The local model gave no usable answer; ``reason`` is the fallback label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class LocalBackend:
    """One vLLM server: its health, its loaded adapters, and completions from it."""

    def __init__(self, settings: LocalSettings, metrics: Metrics, interval_s: float = 1.0) -> None:
        self.settings = settings
        self.base_url = settings.base_url
        self.root = self.base_url.removesuffix("/v1")
        self.metrics = metrics
        self.interval_s = interval_s
        self.healthy = False
        self.loaded: set[str] = set()
        self._failed_loads: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        key = self.settings.api_key_env and os.environ.get(self.settings.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(
            total=self.settings.timeout_s, connect=2.0), json_serialize=lambda v: orjson.dumps(v).decode())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def ready(self, served_name: str) -> bool:
        """Healthy, with this adapter loaded: the local route may be tried."""
        return self.healthy and served_name in self.loaded

    async def watch(self, needed: Callable[[], dict[str, Path]]) -> None:
        """Forever: check health and keep the needed adapters loaded."""
        while True:
            try:
                await self.reconcile(needed())
            except Exception:  # the watch must outlive any one bad round
                log.exception("local model watch failed")
            await asyncio.sleep(self.interval_s)

    async def reconcile(self, needed: dict[str, Path]) -> None:
        """One round: health, served adapters, load what is missing."""
        was_healthy = self.healthy
        self.healthy = await self._health()
        self.metrics.local_up.set(1 if self.healthy else 0)
        if not self.healthy:
            if was_healthy:
                log.warning("local model server %s is down: its paths go upstream", self.base_url)
            self.loaded = set()
            return
        self.loaded = await self._served_adapters()
        for name, folder in needed.items():
            if name in self.loaded or time.monotonic() < self._failed_loads.get(name, 0):
                continue
            if await self._load(name, folder):
                self.loaded.add(name)
                log.info("loaded adapter %s into %s", name, self.base_url)
            else:
                self._failed_loads[name] = time.monotonic() + 30  # do not hammer a failing load

    async def _health(self) -> bool:
        try:
            async with self._session.get(f"{self.root}/health", timeout=aiohttp.ClientTimeout(total=2)) as reply:
                return reply.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def _served_adapters(self) -> set[str]:
        try:
            async with self._session.get(f"{self.base_url}/models") as reply:
                models = orjson.loads(await reply.read())["data"]
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
            return set()
        return {m["id"] for m in models if m.get("parent")}

    async def _load(self, name: str, folder: Path) -> bool:
        body = {"lora_name": name, "lora_path": str(folder.resolve())}
        try:
            async with self._session.post(f"{self.base_url}/load_lora_adapter", json=body) as reply:
                text = await reply.text()
                if reply.status == 200 or "already" in text:
                    return True
                log.error("loading adapter %s from %s failed: HTTP %s %s", name, folder, reply.status, text[:300])
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.error("loading adapter %s failed: %s", name, exc)
        return False

    async def complete(self, body: dict, timeout_s: float) -> dict:
        """A non-streaming chat completion; LocalError (with the fallback reason) otherwise."""
        try:
            async with self._session.post(f"{self.base_url}/chat/completions", json=body,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as reply:
                content = await reply.read()
                if reply.status != 200:
                    raise LocalError("local_error", f"HTTP {reply.status}: {content[:200]!r}")
        except TimeoutError:
            raise LocalError("local_timeout", f"no answer within {timeout_s} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            self.healthy = False  # the next watch round decides again
            raise LocalError("local_unreachable", f"{type(exc).__name__}: {exc}") from None
        try:
            response = orjson.loads(content)
            response["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LocalError("local_error", "the answer is not a chat completion") from None
        return response


class BackgroundWork:
    """Shadow and audit calls: bounded (pending limit, concurrency), never awaited by a client's
    request; what does not fit is dropped and counted."""

    def __init__(self, metrics: Metrics, max_pending: int = 256, concurrency: int = 4) -> None:
        self.metrics = metrics
        self.max_pending = max_pending
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()

    def submit(self, path_label: str, work: Callable[[], asyncio.Future | object]) -> bool:
        """Schedule ``work()`` (a coroutine function); False (counted) when the queue is full."""
        if len(self._tasks) >= self.max_pending:
            self.metrics.shadow_dropped.labels(path_label, "queue_full").inc()
            return False
        task = asyncio.get_running_loop().create_task(self._run(path_label, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, path_label: str, work) -> None:
        async with self._slots:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.shadow_dropped.labels(path_label, "error").inc()
                log.exception("background comparison failed")

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Let pending work finish (bounded), then cancel the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in set(self._tasks):
            task.cancel()
