"""Real server processes for tests: start, wait until healthy, stop (the RemoteOpenAIServer pattern)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ARBITRAGE = [sys.executable, "-m", "arbitrage.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A command that serves HTTP on 127.0.0.1:port, with its output in a log file."""

    def __init__(self, args: list[str], port: int, log: Path, health: str = "/healthz", env: dict | None = None):
        self.args, self.port, self.log, self.health = args, port, log, health
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.health, timeout=1).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.args} did not become healthy:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


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
