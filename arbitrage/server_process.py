"""A server that arbitrage starts as a child process: start it in its own process group, wait
until it answers its health check, stop the whole group (the demo and the tests share this;
vLLM has its own launcher in ``deploy/vllm.py``).

Its own process group (session) means a terminal's Ctrl-C reaches only the parent, which then
stops each child deliberately, and stopping a child also stops whatever that child started
(gateway workers). Output goes to a log file, whose end is quoted when the server fails.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from arbitrage.errors import ArbitrageError

ARBITRAGE = [sys.executable, "-m", "arbitrage.cli"]
"""The arbitrage command line of this installation."""
_LOG_TAIL_CHARS = 3000


_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing), so a killed demo or test run leaves
    no server behind. It only calls the C function resolved at import (no import, no lock taken
    in the forked child, which is what makes a ``preexec_fn`` unsafe next to threads)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerStartError(ArbitrageError):
    """A server exited during startup or did not become healthy in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
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

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start it and return once its health check answers; raises ServerStartError (with the
        end of its log) if it exits or times out, leaving nothing running."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True,
                                         preexec_fn=die_with_parent)  # noqa: PLW1509 - see die_with_parent
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerStartError(f"{self._name()} exited with status {self.proc.returncode}; the end of "
                                       f"{self.log}:\n{self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(f"{self._name()} did not become healthy in {timeout:.0f} s; the end of "
                               f"{self.log}:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + self.health, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the server process itself (not its children), as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server and wait for it; then SIGKILL whatever is left of its process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"

    def _name(self) -> str:
        if self.args[:len(ARBITRAGE)] == ARBITRAGE:
            return f"'arbitrage {self.args[len(ARBITRAGE)]}'"
        return f"'{Path(str(self.args[0])).name}'"
