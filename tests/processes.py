"""Real server processes for tests: start, wait until healthy, stop (the RemoteOpenAIServer pattern).
``ServerProcess`` is shared with the demo (``arbitrage/server_process.py``)."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from arbitrage.server_process import ARBITRAGE, ServerProcess, free_port

__all__ = ["ARBITRAGE", "ServerProcess", "arbitrage", "at_once", "ctrl_c_works", "free_port", "gateway", "simulator"]


def at_once(target: Callable, *args, processes: int = 3, timeout: float = 120) -> list:
    """Run ``target(*args, start, queue)`` in ``processes`` fresh (spawned) processes that begin
    together (``start.wait()``); what each put on ``queue``."""
    context = multiprocessing.get_context("spawn")
    queue, start = context.Queue(), context.Barrier(processes)
    workers = [context.Process(target=target, args=(*args, start, queue)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=timeout) for _ in workers]
    for worker in workers:
        worker.join(30)
    return results


def ctrl_c_works() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT, as Ctrl-C would: Python raises
    KeyboardInterrupt on SIGINT only if SIGINT is not ignored when it starts, and a shell without
    job control starts background commands (a CI run under ``... &``) with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def simulator(tmp: Path, *extra: str) -> ServerProcess:
    port = free_port()
    args = ARBITRAGE + ["sim", "--port", str(port), "--latency-ms", "0", "--token-ms", "0", *extra]
    return ServerProcess(args, port, tmp / f"sim-{port}.log", health="/v1/models")


def gateway(tmp: Path, data_dir: Path, *extra: str, config: Path | None = None,
            env: dict | None = None) -> ServerProcess:
    port = free_port()
    args = ARBITRAGE + ["serve", "--port", str(port), "--data-dir", str(data_dir), *extra]
    if config:
        args += ["--config", str(config)]
    return ServerProcess(args, port, tmp / f"gateway-{port}.log", env=env)


def arbitrage(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the arbitrage command line; returns the finished process (text output)."""
    return subprocess.run(ARBITRAGE + list(args), capture_output=True, text=True, check=check, timeout=120)
