"""Proxy overhead: added latency and throughput of LLM gateways, side by side, in one run.

Every target answers the same chat request from the same upstream stub (`stub_upstream.py`,
pinned to core 1). Each proxy runs alone, pinned to core 0; wrk runs pinned to core 1. For each
target: start it, wait until healthy, check one real answer, warm up, then run wrk several times
at 1 connection (p50/p99 latency) and at 16 connections (requests/s), and stop it. The table
reports medians over the runs; "added" is a proxy's latency minus the direct target's.

Targets:
  direct      wrk -> stub (both on core 1): the floor
  direct-x    wrk on core 0 -> stub on core 1: the cost of crossing cores alone (context)
  arbitrage   this project's gateway, `arbitrage serve --dev` (capture and metrics on)
  litellm     LiteLLM's proxy from its own venv (bench/.work/litellm-venv), 1 worker, no database
  floor-*     `floor_proxy.py`: a bare ASGI app under uvicorn that only forwards, with the httpx,
              aiohttp or a minimal raw asyncio client (bench/.work/floor-venv): the Python floor

    .venv/bin/python bench/proxy_overhead.py                 # all targets, 3 x 10 s per point
    .venv/bin/python bench/proxy_overhead.py --targets direct,litellm --runs 1 --duration 5
    .venv/bin/python bench/proxy_overhead.py --profile arbitrage      # and py-spy it under load

Everything it starts runs in its own process group and is killed on exit, even on error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"
LITELLM_VENV = WORK / "litellm-venv"
FLOOR_VENV = WORK / "floor-venv"
WRK_SCRIPT = BENCH / "chat_request.lua"
PROXY_CORE, CLIENT_CORE = "0", "1"
REQUEST_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Classify the banking query into one intent. Answer JSON."},
            {"role": "user", "content": "I am still waiting on my card?"},
        ],
    },
    separators=(",", ":"),
).encode()
ALL_TARGETS = ("direct", "direct-x", "arbitrage", "litellm", "floor-httpx", "floor-aiohttp", "floor-raw")
# A busy loop at SCHED_IDLE priority: it runs only when nothing else on its core wants to, so it
# takes no time from the measured processes, but it keeps the virtual CPU from halting when idle.
# Waking a halted vCPU goes through the host and costs milliseconds at the tail on this VM.
SPINNER = ["chrt", "--idle", "0", "sh", "-c", "while :; do :; done"]


@dataclass(frozen=True)
class Settings:
    """One benchmark run's knobs, written beside its results."""

    targets: tuple[str, ...]
    runs: int
    duration_s: int
    warmup_s: int
    latency_connections: int
    throughput_connections: int
    stub_port: int
    proxy_port: int
    out_dir: Path
    profile: tuple[str, ...] = ()
    keep_cores_awake: bool = False


@dataclass
class Target:
    """How to start one thing to measure, and how wrk reaches it."""

    name: str
    label: str
    command: list[str] | None
    port: int
    health_path: str
    api_key: str
    env: dict[str, str] = field(default_factory=dict)
    client_core: str = CLIENT_CORE


@dataclass
class WrkRun:
    """One wrk run: its exact percentiles (microseconds) and throughput."""

    connections: int
    requests: int
    duration_us: int
    errors: dict[str, int]
    latency_us: dict[str, float]
    proxy_cpu: float | None = None
    other_cpu: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


@dataclass
class TargetResult:
    name: str
    label: str
    latency_runs: list[WrkRun]
    throughput_runs: list[WrkRun]
    sample_response: dict
    captured_rows: int | None = None
    sent_requests: int = 0
    code_version: str = ""

    def median(self, runs: list[WrkRun], key: str) -> float:
        return statistics.median(run.latency_us[key] for run in runs)

    @property
    def p50_ms(self) -> float:
        return self.median(self.latency_runs, "p50") / 1000

    @property
    def p99_ms(self) -> float:
        return self.median(self.latency_runs, "p99") / 1000

    @property
    def requests_per_s(self) -> float:
        return statistics.median(run.requests_per_s for run in self.throughput_runs)

    @property
    def proxy_cpu(self) -> float | None:
        loads = [run.proxy_cpu for run in self.throughput_runs if run.proxy_cpu is not None]
        return statistics.median(loads) if loads else None

    @property
    def failed(self) -> int:
        return sum(run.failed for run in self.latency_runs + self.throughput_runs)

    @property
    def other_cpu(self) -> float:
        """The most CPU (in cores) that processes outside the benchmark took during one run."""
        return max(run.other_cpu for run in self.latency_runs + self.throughput_runs)


class Service:
    """A child process in its own process group, pinned to one core, logging to a file."""

    running: list[Service] = []

    def __init__(self, name: str, command: list[str], core: str, env: dict[str, str], log: Path):
        self.name = name
        self.log = log
        self.log_file = log.open("wb")
        full_env = {**os.environ, **env}
        self.process = subprocess.Popen(
            ["taskset", "-c", core, *command],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
            process_group=0,  # its own group to kill, but not a new session: with the kernel's
            # autogroup scheduling a new session would be a new CPU-share group and defeat SCHED_IDLE
        )
        Service.running.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log tail:\n{tail}")

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL after 10 s."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=5)
        self._signal_group(signal.SIGKILL)  # stragglers in the group (workers, helpers)
        self.log_file.close()
        Service.running.remove(self)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


def group_cpu_seconds(pgids: set[int]) -> float:
    """User + system CPU time of every live process in the given process groups."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) in pgids:  # after the name: state, ppid, pgrp, ...
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this driver and its finished children (wrk, py-spy)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """CPU use during one wrk run: the proxy's, and that of processes outside the benchmark."""

    def __init__(self, proxy_pgid: int | None) -> None:
        self.proxy_pgid = proxy_pgid
        self.services = {service.pid for service in Service.running}
        self.started = time.monotonic()
        self.proxy, self.ours, self.busy = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        proxy = group_cpu_seconds({self.proxy_pgid}) if self.proxy_pgid else 0.0
        ours = group_cpu_seconds(self.services) + own_cpu_seconds()
        return proxy, ours, machine_busy_seconds()

    def finish(self, run: WrkRun) -> None:
        elapsed = time.monotonic() - self.started
        proxy, ours, busy = self._sample()
        if self.proxy_pgid:
            run.proxy_cpu = (proxy - self.proxy) / elapsed
        run.other_cpu = max(0.0, ((busy - self.busy) - (ours - self.ours)) / elapsed)


def http_request(url: str, api_key: str | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_healthy(url: str, service: Service | None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service:
            service.check_alive()
        try:
            if http_request(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s")


def check_answer(target: Target) -> dict:
    """One real request through the target: it must be a chat.completion with usage."""
    url = f"http://127.0.0.1:{target.port}/v1/chat/completions"
    status, raw = http_request(url, target.api_key, REQUEST_BODY)
    if status != 200:
        raise RuntimeError(f"{target.name}: status {status}: {raw[:500]!r}")
    answer = json.loads(raw)
    if answer.get("object") != "chat.completion" or not answer.get("usage"):
        raise RuntimeError(f"{target.name}: unexpected answer {answer}")
    return answer


def run_wrk(target: Target, connections: int, duration_s: int, pgid: int | None) -> WrkRun:
    command = [
        "taskset", "-c", target.client_core, "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s",
        "--timeout", "10s", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{target.port}",
    ]  # fmt: skip
    env = {**os.environ, "BENCH_API_KEY": target.api_key}
    meter = CpuMeter(pgid)
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("WRK_JSON "))
    run = WrkRun(connections=connections, **json.loads(line.removeprefix("WRK_JSON ")))
    meter.finish(run)
    return run


def measure(target: Target, settings: Settings, service: Service | None) -> TargetResult:
    """Warm up, then the latency runs and the throughput runs."""
    pgid = service.pid if service else None
    answer = check_answer(target)
    warmup = run_wrk(target, settings.throughput_connections, settings.warmup_s, None)
    latency, throughput = [], []
    for index in range(settings.runs):
        latency.append(run_wrk(target, settings.latency_connections, settings.duration_s, pgid))
        throughput.append(run_wrk(target, settings.throughput_connections, settings.duration_s, pgid))
        log(f"  run {index + 1}: {describe(latency[-1])} | {describe(throughput[-1])}")
    if service:
        service.check_alive()
    result = TargetResult(target.name, target.label, latency, throughput, answer)
    result.sent_requests = 1 + warmup.requests + sum(run.requests for run in latency + throughput)
    return result


def profile(target: Target, settings: Settings, service: Service, run_dir: Path, connections: int) -> int:
    """Sample the proxy with py-spy (on the client core) while wrk loads it; returns requests sent."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    folded = run_dir / f"{target.name}-c{connections}.folded"
    command = [
        "taskset", "-c", CLIENT_CORE, py_spy, "record", "--pid", str(service.pid), "--subprocesses",
        "--duration", str(settings.duration_s), "--rate", "250", "--nonblocking", "--full-filenames",
        "--format", "raw", "--output", str(folded),
    ]  # fmt: skip
    log(f"  profiling {target.name} for {settings.duration_s} s at {connections} connections")
    sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        load = run_wrk(target, connections, settings.duration_s + 2, None)
        sampler.wait(timeout=60)
    finally:
        if sampler.poll() is None:
            sampler.kill()
    if not folded.exists():
        raise RuntimeError(f"py-spy wrote no profile: {sampler.stderr.read() if sampler.stderr else ''}")
    log(f"  under profiling: {describe(load)}")
    summary = subprocess.run(
        [sys.executable, str(BENCH / "profile_summary.py"), str(folded), "--top", "25"],
        capture_output=True, text=True, check=True,
    ).stdout
    (run_dir / f"{target.name}-c{connections}-profile.md").write_text(summary)
    return load.requests


def describe(run: WrkRun) -> str:
    text = (
        f"c={run.connections} p50 {run.latency_us['p50'] / 1000:.3f} ms "
        f"p99 {run.latency_us['p99'] / 1000:.3f} ms {run.requests_per_s:,.0f} req/s"
    )
    if run.proxy_cpu is not None:
        text += f" cpu {100 * run.proxy_cpu:.0f}%"
    if run.other_cpu >= 0.05:
        text += f" (others used {run.other_cpu:.2f} cores)"
    if run.failed:
        text += f" ERRORS {run.errors}"
    return text


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_targets(settings: Settings, run_dir: Path) -> dict[str, Target]:
    stub_base = f"http://127.0.0.1:{settings.stub_port}/v1"
    key = "sk-bench-" + secrets.token_hex(16)
    port = settings.proxy_port
    return {
        "direct": Target("direct", "direct to the stub", None, settings.stub_port, "/v1/models", key),
        "direct-x": Target(
            "direct-x", "direct, client on the other core", None, settings.stub_port, "/v1/models", key,
            client_core=PROXY_CORE,
        ),
        "arbitrage": Target(
            "arbitrage", "arbitrage gateway (capture + metrics on)",
            [
                str(ROOT / ".venv/bin/arbitrage"), "serve", "--dev", "--host", "127.0.0.1",
                "--port", str(port), "--upstream-url", stub_base, "--data-dir", str(run_dir / "arbitrage-data"),
            ],
            port, "/healthz", key,
        ),
        "litellm": Target(
            "litellm", "LiteLLM proxy (1 worker, no DB)",
            [
                str(LITELLM_VENV / "bin/litellm"), "--config", str(BENCH / "litellm_config.yaml"),
                "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
            ],
            port, "/health/liveliness", key,
            env={
                "BENCH_STUB_API_BASE": stub_base,
                "LITELLM_MASTER_KEY": key,
                "LITELLM_LOG": "ERROR",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no attempt to fetch prices from the internet
                "LITELLM_MODE": "PRODUCTION",  # do not read a .env file
            },
        ),
        **{
            f"floor-{client}": Target(
                f"floor-{client}", f"floor: bare ASGI + uvicorn, {client} client",
                [
                    str(FLOOR_VENV / "bin/python"), str(BENCH / "floor_proxy.py"), "--client", client,
                    "--port", str(port), "--upstream-url", stub_base,
                ],
                port, "/healthz", key,
            )
            for client in ("httpx", "aiohttp", "raw")
        },
    }  # fmt: skip


def code_version() -> str:
    """The commit the tree is at, `-dirty` when tracked files differ from it (others edit it live)."""
    return command_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"])


def run_target(target: Target, settings: Settings, run_dir: Path) -> TargetResult:
    version = code_version()
    log(f"== {target.name}: {target.label} (tree at {version})")
    with ExitStack() as stack:
        service = None
        if target.command:
            service = Service(target.name, target.command, PROXY_CORE, target.env, run_dir / f"{target.name}.log")
            stack.callback(service.stop)
        wait_healthy(f"http://127.0.0.1:{target.port}{target.health_path}", service)
        result = measure(target, settings, service)
        if target.name in settings.profile and service:
            for connections in (settings.latency_connections, settings.throughput_connections):
                result.sent_requests += profile(target, settings, service, run_dir, connections)
    if target.name == "arbitrage":
        result.captured_rows = captured_rows(run_dir / "arbitrage-data")
    result.code_version = version
    return result


def captured_rows(data_dir: Path) -> int:
    """Rows the gateway captured (Parquet plus any journal lines), read after it stopped."""
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in data_dir.rglob("*.parquet"))
    return rows + sum(path.read_bytes().count(b"\n") for path in data_dir.rglob("*.jsonl"))


def run_all(settings: Settings, run_dir: Path) -> list[TargetResult]:
    """Start the stub, then measure each target in turn; everything is stopped whatever happens."""
    targets = build_targets(settings, run_dir)
    stub_command = [sys.executable, str(BENCH / "stub_upstream.py"), "--port", str(settings.stub_port)]
    with ExitStack() as stack:
        if settings.keep_cores_awake:
            for core in (PROXY_CORE, CLIENT_CORE):
                spinner = Service(f"spinner-{core}", SPINNER, core, {}, run_dir / f"spinner-{core}.log")
                stack.callback(spinner.stop)
        stub = Service("stub", stub_command, CLIENT_CORE, {}, run_dir / "stub.log")
        stack.callback(stub.stop)
        wait_healthy(f"http://127.0.0.1:{settings.stub_port}/v1/models", stub)
        return [run_target(targets[name], settings, run_dir) for name in settings.targets]


def ms(value: float) -> str:
    return f"{value:.3f}"


def markdown_table(results: list[TargetResult], settings: Settings) -> str:
    by_name = {result.name: result for result in results}
    direct, litellm = by_name.get("direct"), by_name.get("litellm")
    rows = [
        f"| target | p50 ms | p99 ms | added p50 ms | added p99 ms "
        f"| req/s at {settings.throughput_connections} conns | proxy CPU | vs LiteLLM req/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        added = (
            (ms(result.p50_ms - direct.p50_ms), ms(result.p99_ms - direct.p99_ms))
            if direct and result is not direct
            else ("-", "-")
        )
        ratio = f"{result.requests_per_s / litellm.requests_per_s:.1f}x" if litellm else "-"
        label = f"{result.label} @ {result.code_version}" if result.name == "arbitrage" else result.label
        cpu = f"{100 * result.proxy_cpu:.0f}%" if result.proxy_cpu is not None else "-"
        rows.append(
            f"| {label} | {ms(result.p50_ms)} | {ms(result.p99_ms)} | {added[0]} | {added[1]} "
            f"| {result.requests_per_s:,.0f} | {cpu} | {ratio} |"
        )
    awake = "kept awake by SCHED_IDLE busy loops" if settings.keep_cores_awake else "left to idle (halt) as usual"
    note = (
        f"\nLatency at {settings.latency_connections} connection, throughput at "
        f"{settings.throughput_connections}; medians of {settings.runs} wrk runs of {settings.duration_s} s each; "
        f"cores {awake}."
    )
    for result in results:
        if result.captured_rows is not None:
            note += (
                f"\n\nThe gateway captured {result.captured_rows:,} calls of the "
                f"{result.sent_requests:,} requests wrk completed through it (warm-up and profiling included; "
                "requests still in flight when a wrk run stops are captured but not counted by wrk)."
            )
    busy = [f"{r.name} {r.other_cpu:.2f}" for r in results if r.other_cpu >= 0.05]
    if busy:
        note += (
            "\n\n**Other processes were busy during the runs** (most cores they used in one run): "
            + ", ".join(busy)
        )
    failed = [f"{r.name}: {r.failed}" for r in results if r.failed]
    if failed:
        note += f"\n\n**Failed requests (socket errors or non-2xx):** {', '.join(failed)}"
    return "\n".join(rows) + "\n" + note + "\n"


def command_output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts() -> dict[str, str]:
    model = next(
        (line.split(":", 1)[1].strip() for line in command_output(["lscpu"]).splitlines() if "Model name" in line),
        "",
    )
    litellm_python = LITELLM_VENV / "bin/python"
    return {
        "nproc": command_output(["nproc"]),
        "cpu_model": model,
        "memory": command_output(["free", "-h"]).splitlines()[1].split()[1] if shutil.which("free") else "",
        "python": platform.python_version(),
        "wrk": " ".join(command_output(["wrk", "--version"]).split()[:2]),
        "litellm": command_output(
            [str(litellm_python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
        ),
        "git_commit": code_version(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_results(
    results: list[TargetResult], settings: Settings, run_dir: Path, command: str, facts: dict[str, str]
) -> str:
    table = markdown_table(results, settings)
    header = (
        f"Command: `{command}`\n\nMachine: {facts['nproc']} cores ({facts['cpu_model']}), "
        f"{facts['memory']} memory, Python {facts['python']}, {facts['wrk']}, LiteLLM {facts['litellm']}, "
        f"tree at {facts['git_commit']} when started, {facts['date_utc']}\n\n"
    )
    (run_dir / "results.md").write_text(header + table)
    raw = {
        "command": command,
        "settings": {**asdict(settings), "out_dir": str(settings.out_dir)},
        "machine": facts,
        "results": [
            {**asdict(result), "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
             "requests_per_s": result.requests_per_s}
            for result in results
        ],
    }
    (run_dir / "results.json").write_text(json.dumps(raw, indent=2))
    return header + table


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma-separated, from {ALL_TARGETS}")
    parser.add_argument("--runs", type=int, default=3, help="wrk runs per point; the table shows medians")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up load per target")
    parser.add_argument("--latency-connections", type=int, default=1)
    parser.add_argument("--throughput-connections", type=int, default=16)
    parser.add_argument("--stub-port", type=int, default=18100)
    parser.add_argument("--proxy-port", type=int, default=18101)
    parser.add_argument(
        "--profile", default="", metavar="TARGETS",
        help="comma-separated proxies to py-spy under load after measuring them (at both connection counts)",
    )
    parser.add_argument(
        "--keep-cores-awake", action="store_true",
        help="run a SCHED_IDLE busy loop on both cores, so that no vCPU halts between requests",
    )
    parser.add_argument("--out-dir", type=Path, default=WORK / "runs", help="a timestamped folder is made here")
    args = parser.parse_args(argv)
    targets = tuple(name.strip() for name in args.targets.split(",") if name.strip())
    profiled = tuple(name.strip() for name in args.profile.split(",") if name.strip())
    unknown = (set(targets) | set(profiled)) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {ALL_TARGETS}")
    return Settings(
        targets, args.runs, args.duration, args.warmup, args.latency_connections,
        args.throughput_connections, args.stub_port, args.proxy_port, args.out_dir, profiled,
        args.keep_cores_awake,
    )  # fmt: skip


def raise_on_sigterm() -> None:
    """Turn SIGTERM into an exception so that the `finally` blocks stop every child."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    settings = parse_settings()
    raise_on_sigterm()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    run_dir = settings.out_dir / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True)
    facts = machine_facts()
    results = run_all(settings, run_dir)
    command = " ".join([".venv/bin/python", os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    print(write_results(results, settings, run_dir, command, facts))
    log(f"results, logs and raw runs in {run_dir}")


if __name__ == "__main__":
    main()
