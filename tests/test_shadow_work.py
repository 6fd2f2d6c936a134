"""The gateway's background work (shadow and audit comparisons): bounded by ``[local]
shadow_queue`` and ``shadow_concurrency``, what does not fit dropped and counted, never raised."""

from __future__ import annotations

import asyncio

import pytest

from arbitrage.config import load_config
from arbitrage.errors import ConfigError
from gateway.local import BackgroundWork
from gateway.metrics import Metrics


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("arbitrage_shadow_dropped_total", {"path": "p", "reason": reason}) or 0.0


def test_work_beyond_the_queue_is_dropped_and_counted_and_no_more_than_the_concurrency_runs():
    async def scenario():
        metrics = Metrics()
        work = BackgroundWork(metrics, max_pending=5, concurrency=2)
        running, most, release = 0, 0, asyncio.Event()

        async def compare():
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1

        accepted = [work.submit("p", compare) for _ in range(8)]
        await asyncio.sleep(0.05)
        assert (most, work.pending) == (2, 5)
        release.set()
        await work.drain()
        return accepted, metrics, work.pending

    accepted, metrics, pending = asyncio.run(scenario())
    assert accepted == [True] * 5 + [False] * 3 and pending == 0
    assert dropped(metrics, "queue_full") == 3


def test_a_failing_comparison_is_counted_not_raised():
    async def scenario():
        metrics = Metrics()
        work = BackgroundWork(metrics)

        async def broken():
            raise RuntimeError("the local model answered garbage")

        work.submit("p", broken)
        await work.drain()
        return metrics

    assert dropped(asyncio.run(scenario()), "error") == 1


def test_the_limits_come_from_the_config(tmp_path):
    config = tmp_path / "arbitrage.toml"
    config.write_text("[local]\nshadow_concurrency = 16\nshadow_queue = 2048\n")
    local = load_config(config).local
    assert (local.shadow_concurrency, local.shadow_queue) == (16, 2048)
    config.write_text("[local]\nshadow_queue = 0\n")
    with pytest.raises(ConfigError, match="shadow_concurrency and shadow_queue must be at least 1"):
        load_config(config)
