"""Delays that make the simulator feel like a remote model API."""

from __future__ import annotations

import asyncio
import math
import random

from simulator.config import SimulatorConfig


class Pacing:
    """Log-normal latency before an answer (time to first chunk for streams), a fixed delay
    between streamed chunks, and the extra delay of the ``slow`` mode. ``latency_ms=0``
    turns off the latency and the chunk delay; ``slow`` still waits ``slow_ms``."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._enabled = config.latency_ms > 0
        self._log_median = math.log(config.latency_ms / 1000) if self._enabled else 0.0
        self._sigma = config.latency_sigma
        self._chunk_seconds = config.token_ms / 1000 if self._enabled else 0.0
        self._slow_seconds = config.slow_ms / 1000
        self._random = random.Random(f"latency-{config.seed}")

    def latency_seconds(self) -> float:
        """One draw of the latency before an answer."""
        if not self._enabled:
            return 0.0
        return self._random.lognormvariate(self._log_median, self._sigma)

    async def before_answer(self, slow: bool = False) -> None:
        """Wait as long as the upstream would before answering."""
        await _sleep(self.latency_seconds() + (self._slow_seconds if slow else 0.0))

    async def between_chunks(self) -> None:
        """Wait between two streamed chunks."""
        await _sleep(self._chunk_seconds)


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)
