"""Soak and faults: a fixed request rate through a 2-worker gateway for minutes, with faults
injected as phases of the same run, and every answered request checked against the capture store.

    .venv/bin/python bench/soak.py                          # 200 req/s: 3 min steady, then the faults
    .venv/bin/python bench/soak.py --rate 50 --minutes 0.5 --fault-seconds 10 --phases steady,kill

Everything runs on 127.0.0.1: the simulator (`arbitrage sim`) as upstream, `arbitrage serve
--workers 2` with its data folder on a small ext4 file system in a loop-mounted file made for the
run (so that it can be filled), and an open-loop load generator in this process (asyncio,
aiohttp, uvloop). Open loop: request i is due at start + i/rate whatever happened to the earlier
ones, and its latency is measured from that due time, not from when it was actually sent, so a
stalled gateway (or generator) shows in the latency instead of silently lowering the rate
(coordinated omission).

Phases, in this order (``--phases`` picks some):
  warmup   10 s, not in the steady figures
  steady   --minutes of ordinary calls: rate held, p50/p99, RSS over time, capture backlog
  429      a quarter of the calls ask for model error-429 (Retry-After: 1, honoured up to
           retry_max_wait_s = 1): the client must see the upstream's 429 after 2 retries
  5xx      a quarter ask for error-503 or flaky-50: 503s after retries, flaky ones mostly rescued
  timeout  a quarter ask for hang or slow (5 s) with timeout_s = 2: 504 upstream_timeout
  cutoff   a quarter ask for cutoff (half streamed): an error event / 502 upstream_broken
  disk     the data file system is filled (a fallocated file) for half the phase, then freed
  refuse   the simulator is stopped a quarter into the phase and started again at three quarters
  kill     the gateway's whole process group gets SIGKILL 2 s in and is started again at once
           (the script plays the service manager)
In every phase the other calls must be answered as usual. An outcome the phase does not explain
(a 5xx the upstream did not send, a dropped connection while the gateway is up) is "unexpected";
an answered call with no record and no "capture failed" log line is "lost". Both must be 0.

Writes bench/.work/soak/<UTC time>/: summary.md (also printed), results.json, timeline.csv, logs.
Everything it starts is stopped, and the file system unmounted, on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import uvloop

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from arbitrage.capture.store import connect
from arbitrage.server_process import ARBITRAGE, ServerProcess, free_port
from bench.proxy_overhead import group_cpu_seconds, machine_busy_seconds

CONFIG = """
[gateway]
workers = {workers}

[[upstreams]]
name = "sim"
base_url = "{sim}/v1"
models = ["*"]
timeout_s = 2
max_retries = 2
retry_max_wait_s = 1
"""
TEXTS = ROOT / "simulator" / "data" / "banking77" / "train.csv"
NORMAL = "gpt-4o-mini"
FAULT_MODELS = {"429": ["error-429"], "5xx": ["error-503", "flaky-50:gpt-4o-mini"], "timeout": ["hang", "slow"],
                "cutoff": ["cutoff"]}
ALLOWED = {  # outcomes a request for this model may have
    NORMAL: {"ok"}, "error-429": {"upstream 429"}, "error-503": {"upstream 503"},
    "flaky-50:gpt-4o-mini": {"ok", "upstream 500"}, "hang": {"gateway 504 upstream_timeout"},
    "slow": {"gateway 504 upstream_timeout"}, "cutoff": {"stream stream_cut_off", "gateway 502 upstream_broken"},
}
PHASE_ALLOWED = {"refuse": {"gateway 502 upstream_unreachable"},
                 "kill": {"connection refused", "disconnected"}}  # while the gateway is down or dying
PHASES = ("warmup", "steady", "429", "5xx", "timeout", "cutoff", "disk", "refuse", "kill")
SAMPLE_S = 2.0
UPSTREAM_KEY = "sk-soak-upstream-credential-never-stored"


@dataclass
class Result:
    """One request as the client saw it."""

    index: int
    phase: str
    model: str
    stream: bool
    due: float
    sent: float = 0.0
    done: float = 0.0
    outcome: str = ""
    request_id: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.due) * 1000


@dataclass
class Sample:
    t: float
    phase: str
    gateway_rss_mb: float
    worker_rss_mb: list[float]
    rss_by_role_mb: dict[str, float]
    backlog_bytes: float | None
    backlog_segments: float | None
    capture_failures: float | None
    loadavg: float
    in_flight: int
    cpu_gateway_s: float
    cpu_sim_s: float
    cpu_machine_s: float
    cpu_self_s: float


@dataclass
class Run:
    """What the run started, for clean-up and for the phases' actions."""

    dir: Path
    args: argparse.Namespace
    sim: ServerProcess | None = None
    gateway: ServerProcess | None = None
    mount: Path | None = None
    key: str = ""
    metrics_key: str = ""
    events: list[tuple[float, str]] = field(default_factory=list)
    failures_before_kill: float | None = None
    last_metrics: str = ""

    def note(self, text: str) -> None:
        self.events.append((time.monotonic(), text))
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)


# Processes and the file system


def start_sim(run: Run, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    args = ARBITRAGE + ["sim", "--port", str(port), "--latency-ms", str(run.args.sim_latency_ms),
                        "--latency-sigma", "0.3", "--token-ms", "2", "--log-level", "warning"]
    return ServerProcess(args, port, run.dir / "sim.log", health="/v1/models").start()


def gateway_process(run: Run) -> ServerProcess:
    config = run.dir / "soak.toml"
    config.write_text(CONFIG.format(workers=run.args.workers, sim=run.sim.url))
    args = ARBITRAGE + ["serve", "--port", str(free_port()), "--config", str(config), "--data-dir",
                        str(run.mount / "data"), "--log-level", "warning"]
    return ServerProcess(args, int(args[args.index("--port") + 1]), run.dir / "gateway.log",
                         env={"OPENAI_API_KEY": UPSTREAM_KEY})


def arbitrage(*args: str) -> str:
    return subprocess.run(ARBITRAGE + list(args), capture_output=True, text=True, check=True).stdout.strip()


def mount_disk(run: Run) -> None:
    """An ext4 file system in a sparse file, loop-mounted, without reserved blocks."""
    image, mount = run.dir / "disk.img", run.dir / "disk"
    mount.mkdir()
    subprocess.run(["truncate", "-s", f"{run.args.disk_mb}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    run.mount = mount


def unmount_disk(run: Run) -> None:
    if run.mount is None:
        return
    if subprocess.run(["umount", str(run.mount)], check=False).returncode:
        subprocess.run(["umount", "-l", str(run.mount)], check=False)
    (run.dir / "disk.img").unlink(missing_ok=True)
    run.mount = None


def fill_disk(mount: Path, leave_bytes: int = 65536) -> Path:
    filler = mount / "filler"
    stat = os.statvfs(mount)
    subprocess.run(["fallocate", "-l", str(max(0, stat.f_bavail * stat.f_frsize - leave_bytes)), str(filler)],
                   check=True)
    return filler


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry.name))
    return pids


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def role(pid: int, leader: int) -> str:
    """supervisor | worker (spawned by the supervisor) | child (spawned by a worker: the compaction
    process) | other (multiprocessing's resource tracker)."""
    with contextlib.suppress(OSError):
        if pid == leader:
            return "supervisor"
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return "worker" if ppid == leader else "child"
    return "other"


# The load


class Load:
    """Open-loop load: request i is due at start + i / rate, sent then whatever else is pending."""

    def __init__(self, run: Run, session: aiohttp.ClientSession, texts: list[str]) -> None:
        self.run, self.session, self.texts = run, session, texts
        self.results: list[Result] = []
        self.in_flight: set[asyncio.Task] = set()
        self.index = 0
        self.start = 0.0

    async def phase(self, name: str, seconds: float) -> None:
        """Send at the rate for ``seconds``; a quarter of the calls use the phase's fault models."""
        loop = asyncio.get_running_loop()
        if not self.start:
            self.start = loop.time()
        models = FAULT_MODELS.get(name, [])
        end_index = self.index + int(seconds * self.run.args.rate)
        while self.index < end_index:
            due = self.start + self.index / self.run.args.rate
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            i = self.index
            model = models[(i // 4) % len(models)] if models and i % 4 == 0 else NORMAL
            result = Result(i, name, model, stream=(i % 4 == 1) or (model == "cutoff" and i % 8 == 0), due=due)
            task = asyncio.ensure_future(self.one(result))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            self.index += 1

    async def one(self, result: Result) -> None:
        body = {"model": result.model, "stream": result.stream,
                "messages": [{"role": "user", "content": self.texts[result.index % len(self.texts)]}]}
        loop = asyncio.get_running_loop()
        result.sent = loop.time()
        try:
            async with self.session.post(self.run.gateway.url + "/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {self.run.key}"}) as response:
                content = await response.read()
                result.request_id = response.headers.get("x-arbitrage-request-id")
                result.outcome = classify(response, content, result.stream)
        except aiohttp.ClientConnectorError:
            result.outcome = "connection refused"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError):
            result.outcome = "disconnected"
        except TimeoutError:
            result.outcome = "client timeout"
        result.done = loop.time()
        self.results.append(result)

    async def drain(self) -> None:
        while self.in_flight:
            await asyncio.gather(*list(self.in_flight), return_exceptions=True)


def classify(response: aiohttp.ClientResponse, content: bytes, stream: bool) -> str:
    """ok | upstream NNN (an upstream answer relayed: it carries the gateway's request id) |
    gateway NNN code (the gateway's own error, which carries none) | stream CODE (an error event
    instead of [DONE])."""
    if response.status == 200:
        if not stream or content.endswith(b"data: [DONE]\n\n"):
            return "ok"
        match = re.search(rb'"code":\s*"(\w+)"', content)
        return f"stream {match.group(1).decode() if match else 'no [DONE]'}"
    if "x-arbitrage-request-id" in response.headers:
        return f"upstream {response.status}"
    try:
        code = json.loads(content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "not OpenAI's error shape"
    return f"gateway {response.status} {code}"


# Sampling


async def sample_forever(run: Run, load: Load, samples: list[Sample], session: aiohttp.ClientSession,
                         current: list[str]) -> None:
    while True:
        samples.append(await sample(run, load, session, current[0]))
        await asyncio.sleep(SAMPLE_S)


async def sample(run: Run, load: Load, session: aiohttp.ClientSession, phase: str) -> Sample:
    leader = run.gateway.proc.pid if run.gateway and run.gateway.running() else -1
    roles = [(role(p, leader), rss_mb(p)) for p in group_pids(leader)] if leader > 0 else []
    by_role: dict[str, float] = defaultdict(float)
    for name, mb in roles:
        by_role[name] = round(by_role[name] + mb, 1)
    metrics = await scrape(run, session)
    return Sample(time.monotonic(), phase, sum(mb for _, mb in roles),
                  sorted(round(mb, 1) for name, mb in roles if name == "worker"), dict(by_role),
                  metrics.get("arbitrage_capture_backlog_bytes"), metrics.get("arbitrage_capture_backlog_segments"),
                  metrics.get("arbitrage_capture_failures_total"), os.getloadavg()[0], len(load.in_flight),
                  group_cpu_seconds({leader}) if leader > 0 else 0.0,
                  group_cpu_seconds({run.sim.proc.pid}) if run.sim and run.sim.running() else 0.0,
                  machine_busy_seconds(), time.process_time())


async def scrape(run: Run, session: aiohttp.ClientSession) -> dict[str, float]:
    try:
        async with session.get(run.gateway.url + "/metrics", headers={"Authorization": f"Bearer {run.metrics_key}"},
                               timeout=aiohttp.ClientTimeout(total=2)) as response:
            text = await response.text()
    except (TimeoutError, aiohttp.ClientError):
        return {}
    if response.status == 200:
        run.last_metrics = text
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("arbitrage_capture_backlog_bytes", "arbitrage_capture_backlog_segments",
                    "arbitrage_capture_failures_total"):
            values[name] = values.get(name, 0.0) + float(value)
    return values


# Phases


async def run_phase(name: str, seconds: float, run: Run, load: Load, session: aiohttp.ClientSession) -> None:
    run.note(f"phase {name}: {seconds:.0f} s at {run.args.rate:g} req/s")
    send = asyncio.ensure_future(load.phase(name, seconds))
    try:
        if name == "disk":
            filler = fill_disk(run.mount)
            run.note(f"data file system full ({os.statvfs(run.mount).f_bavail * os.statvfs(run.mount).f_frsize} "
                     "bytes left)")
            await asyncio.sleep(seconds / 2)
            filler.unlink()
            run.note("space freed")
        elif name == "refuse":
            await asyncio.sleep(seconds / 4)
            port = run.sim.port
            await asyncio.to_thread(run.sim.stop)
            run.note("upstream stopped: connections refused")
            await asyncio.sleep(seconds / 2)
            run.sim = await asyncio.to_thread(start_sim, run, port)
            run.note("upstream started again")
        elif name == "kill":
            await asyncio.sleep(2)
            run.failures_before_kill = (await scrape(run, session)).get("arbitrage_capture_failures_total")
            os.killpg(run.gateway.proc.pid, signal.SIGKILL)
            run.gateway.proc.wait()
            run.note("gateway process group killed with SIGKILL")
            await asyncio.to_thread(run.gateway.start, 60)
            run.note("gateway started again")
        await send
    finally:
        send.cancel()


async def drive(run: Run) -> tuple[list[Result], list[Sample]]:
    with TEXTS.open(newline="") as rows:
        texts = [row["text"] for row in csv.DictReader(rows)][:500]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    samples: list[Sample] = []
    current = ["warmup"]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        load = Load(run, session, texts)
        sampler = asyncio.ensure_future(sample_forever(run, load, samples, session, current))
        try:
            for name in run.args.phases:
                current[0] = name
                await run_phase(name, phase_seconds(name, run.args), run, load, session)
            current[0] = "drain"
            await asyncio.wait_for(load.drain(), 60)
            samples.append(await sample(run, load, session, "end"))
        finally:
            sampler.cancel()
    return load.results, samples


def phase_seconds(name: str, args: argparse.Namespace) -> float:
    return {"warmup": 10.0, "steady": args.minutes * 60}.get(name, args.fault_seconds)


# Checking and reporting


def recorded(data_dir: Path) -> tuple[Counter, Counter]:
    """(records per request id, records per (status, error type) of the gateway's own errors)."""
    con = connect(data_dir)
    per_id = Counter(dict(con.execute("SELECT request_id, count(*) FROM calls GROUP BY ALL").fetchall()))
    own = Counter({(s, e): n for s, e, n in con.execute(
        "SELECT status_code, error_type, count(*) FROM calls WHERE error_type IN "
        "('upstream_unreachable', 'upstream_timeout', 'upstream_broken') AND status_code IN (502, 504) "
        "GROUP BY ALL").fetchall()})
    return per_id, own


def leaked_secrets(run: Run) -> dict[str, int]:
    """Secrets (the client key, the metrics key, the upstream credential) found in the data folder,
    the gateway's log or its metrics, by secret: must be all 0."""
    files = [f for f in (run.dir / "data-copy").rglob("*") if f.is_file()] + [run.dir / "gateway.log"]
    haystacks = [f.read_bytes() for f in files] + [run.last_metrics.encode()]
    secrets = {"client key": run.key, "metrics key": run.metrics_key, "upstream key": UPSTREAM_KEY}
    return {name: sum(secret.encode() in h for h in haystacks) for name, secret in secrets.items()}


def capture_failed_ids(log: Path) -> set[str]:
    return set(re.findall(r"capture failed for request (\w+)", log.read_text(errors="replace")))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(run: Run, results: list[Result], samples: list[Sample]) -> dict:
    per_id, own_errors = recorded(run.dir / "data-copy")
    failed_capture = capture_failed_ids(run.gateway.log)
    answered = [r for r in results if r.request_id]
    lost = [r.request_id for r in answered if r.request_id not in per_id and r.request_id not in failed_capture]
    twice = [i for i, n in per_id.items() if n > 1]
    client_own = Counter()
    for r in results:
        if r.outcome.startswith("gateway ") and not r.request_id:
            status, code = r.outcome.split()[1:3]
            client_own[(int(status), code)] += 1
    lost_without_id = sum(max(0, n - own_errors.get(k, 0)) for k, n in client_own.items())
    phases = {}
    for name in run.args.phases:
        rs = [r for r in results if r.phase == name]
        if rs:
            phases[name] = phase_summary(name, rs, run.args.rate, phase_seconds(name, run.args))
            phases[name]["in_flight_max"] = max((x.in_flight for x in samples if x.phase == name), default=None)
            phases[name]["cores_used"] = cores_used([x for x in samples if x.phase == name])
    return {"phases": phases, "answered_with_id": len(answered), "recorded_rows": sum(per_id.values()),
            "not_recorded_disk_full": len(failed_capture), "lost": lost, "lost_without_id": lost_without_id,
            "recorded_twice": twice, "gateway_errors_by_client": {f"{k[0]} {k[1]}": n for k, n in client_own.items()},
            "gateway_errors_recorded": {f"{k[0]} {k[1]}": n for k, n in own_errors.items()},
            "memory": memory_summary(samples), "backlog": backlog_summary(samples),
            "capture_failures_metric_before_kill": run.failures_before_kill, "leaked": leaked_secrets(run),
            "events": [(round(t - samples[0].t, 1), text) for t, text in run.events] if samples else []}


def phase_summary(name: str, rs: list[Result], rate: float, seconds: float) -> dict:
    allowed = PHASE_ALLOWED.get(name, set())
    unexpected = Counter(f"{r.model}: {r.outcome}" for r in rs if r.outcome not in ALLOWED[r.model] | allowed)
    ok = [r.latency_ms for r in rs if r.outcome == "ok" and r.model == NORMAL]
    lag = [max(0.0, r.sent - r.due) * 1000 for r in rs]
    span = max(r.done for r in rs) - min(r.due for r in rs)
    by_outcome = defaultdict(list)
    for r in rs:
        by_outcome[f"{r.model}: {r.outcome}"].append(r.latency_ms)
    return {"requests": len(rs), "target_rate": rate, "sent_rate": len(rs) / seconds,
            "answered_rate": len(rs) / span if span else 0, "p50_ms": percentile(ok, 0.5),
            "p99_ms": percentile(ok, 0.99), "p999_ms": percentile(ok, 0.999), "max_ms": max(ok, default=float("nan")),
            "send_lag_p99_ms": percentile(lag, 0.99), "send_lag_max_ms": max(lag),
            "outcomes": {k: {"n": len(v), "p50_ms": round(percentile(v, 0.5), 1)} for k, v in sorted(by_outcome.items())},
            "unexpected": dict(unexpected)}


def cores_used(samples: list[Sample]) -> dict[str, float]:
    """CPU used during a phase, in cores: the gateway (all its processes), the simulator, this
    generator, and everything else on the machine (other sessions)."""
    if len(samples) < 2:
        return {}
    a, b = samples[0], samples[-1]
    seconds = b.t - a.t
    used = {"gateway": b.cpu_gateway_s - a.cpu_gateway_s, "sim": b.cpu_sim_s - a.cpu_sim_s,
            "generator": b.cpu_self_s - a.cpu_self_s}
    if used["gateway"] < 0 or used["sim"] < 0:  # restarted within the phase
        return {}
    used["others"] = b.cpu_machine_s - a.cpu_machine_s - sum(used.values())
    return {k: round(v / seconds, 2) for k, v in used.items()}


def memory_summary(samples: list[Sample]) -> dict:
    steady = [s for s in samples if s.phase == "steady" and s.worker_rss_mb]
    if len(steady) < 4:
        return {}
    quarter = max(1, len(steady) // 4)
    first, last = steady[:quarter], steady[-quarter:]
    return {"steady_first_quarter_mb": round(statistics.median(s.gateway_rss_mb for s in first), 1),
            "steady_last_quarter_mb": round(statistics.median(s.gateway_rss_mb for s in last), 1),
            "workers_first_mb": first[0].worker_rss_mb, "workers_last_mb": last[-1].worker_rss_mb,
            "by_role_first_mb": first[0].rss_by_role_mb, "by_role_last_mb": last[-1].rss_by_role_mb,
            "max_mb_whole_run": round(max(s.gateway_rss_mb for s in samples), 1)}


def backlog_summary(samples: list[Sample]) -> dict:
    values = [s for s in samples if s.backlog_bytes is not None]
    steady = [s.backlog_bytes for s in values if s.phase == "steady"]
    return {"steady_max_bytes": max(steady, default=None), "run_max_bytes": max((s.backlog_bytes for s in values), default=None),
            "run_max_segments": max((s.backlog_segments for s in values), default=None),
            "end_bytes": values[-1].backlog_bytes if values else None}


def markdown(summary: dict, run: Run, facts: dict) -> str:
    lines = [f"Command: `{facts['command']}`", "",
             (f"Machine: {facts['machine']}; tree {facts['commit']}; {facts['date']}; load average at start "
             f"{facts['load_start']}, at end {facts['load_end']}"), "",
             ("| phase | requests | answered req/s | p50 ms | p99 ms | p99.9 ms | max ms | send lag p99 ms "
             "| in flight max | unexpected |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in summary["phases"].items():
        lines.append(f"| {name} | {p['requests']} | {p['answered_rate']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
                     f"{p['p999_ms']:.1f} | {p['max_ms']:.1f} | {p['send_lag_p99_ms']:.1f} | {p['in_flight_max']} | "
                     f"{sum(p['unexpected'].values())} |")
    lines += ["", "p50/p99 are of the ordinary calls answered 200, from their due time.", "", "Outcomes by phase:"]
    for name, p in summary["phases"].items():
        outcomes = ", ".join(f"{k} {v['n']} (p50 {v['p50_ms']:.0f} ms)" for k, v in p["outcomes"].items())
        lines.append(f"- {name}: {outcomes}" + (f"; UNEXPECTED: {p['unexpected']}" if p["unexpected"] else "")
                     + f"; cores used {p['cores_used']}")
    m, b = summary["memory"], summary["backlog"]
    lines += ["", (f"Records: {summary['answered_with_id']} answers with a request id, {summary['recorded_rows']} rows in "
              f"`calls`, {summary['not_recorded_disk_full']} not recorded while the disk was full (each counted and "
              f"logged), lost {len(summary['lost'])}, gateway-made errors without an id lost "
              f"{summary['lost_without_id']} (client saw {summary['gateway_errors_by_client']}, recorded "
              f"{summary['gateway_errors_recorded']}), recorded twice {len(summary['recorded_twice'])}."),
              f"Capture failures metric before the kill: {summary['capture_failures_metric_before_kill']}.",
              (f"Secrets found in the data folder ({sum(1 for _ in (run.dir / 'data-copy').rglob('*'))} entries), "
              f"the gateway's log and its metrics: {summary['leaked']}."),
              (f"Memory (gateway process group RSS): steady first quarter {m.get('steady_first_quarter_mb')} MB, "
              f"last quarter {m.get('steady_last_quarter_mb')} MB; workers {m.get('workers_first_mb')} -> "
              f"{m.get('workers_last_mb')} MB; by process {m.get('by_role_first_mb')} -> {m.get('by_role_last_mb')}; "
              f"max over the run {m.get('max_mb_whole_run')} MB."),
              (f"Capture backlog: steady max {b['steady_max_bytes']} bytes, run max {b['run_max_bytes']} bytes / "
              f"{b['run_max_segments']} segments, at the end {b['end_bytes']} bytes."),
              "", "Events: " + "; ".join(f"{t} s {text}" for t, text in summary["events"])]
    return "\n".join(lines) + "\n"


def write_requests(path: Path, results: list[Result], t0: float) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["index", "phase", "model", "stream", "due_s", "sent_lag_ms", "latency_ms", "outcome",
                         "request_id"])
        for r in sorted(results, key=lambda r: r.index):
            writer.writerow([r.index, r.phase, r.model, int(r.stream), round(r.due - t0, 4),
                             round((r.sent - r.due) * 1000, 2), round(r.latency_ms, 2), r.outcome, r.request_id or ""])


def write_timeline(path: Path, samples: list[Sample], results: list[Result]) -> None:
    t0 = samples[0].t if samples else 0
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["t_s", "phase", "gateway_rss_mb", "worker_rss_mb", "backlog_bytes", "backlog_segments",
                         "capture_failures", "loadavg", "in_flight"])
        for s in samples:
            writer.writerow([round(s.t - t0, 1), s.phase, round(s.gateway_rss_mb, 1), " ".join(map(str, s.worker_rss_mb)),
                             s.backlog_bytes, s.backlog_segments, s.capture_failures, s.loadavg, s.in_flight])


def machine_facts(args: argparse.Namespace) -> dict:
    def out(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()

    model = next((line.split(":", 1)[1].strip() for line in out("lscpu").splitlines() if "Model name" in line), "")
    return {"command": " ".join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]]),
            "machine": f"{os.cpu_count()} cores ({model}), {out('free', '-h').splitlines()[1].split()[1]} memory, "
                       f"Python {sys.version.split()[0]}",
            "commit": out("git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="requests per second (open loop)")
    parser.add_argument("--minutes", type=float, default=3, help="length of the steady phase")
    parser.add_argument("--fault-seconds", type=float, default=20, help="length of each fault phase")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in order, from {PHASES}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sim-latency-ms", type=float, default=50, help="the simulator's median latency")
    parser.add_argument("--disk-mb", type=int, default=1024, help="size of the data file system")
    parser.add_argument("--out-dir", type=Path, default=BENCH / ".work" / "soak")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}")
    if args.minutes > 15 or args.rate > 2000:
        parser.error("keep it bounded: at most 15 minutes and 2,000 req/s")
    return args


def start(run: Run) -> None:
    mount_disk(run)
    data = str(run.mount / "data")
    run.key = arbitrage("keys", "create", "soak", "--data-dir", data)
    run.metrics_key = arbitrage("keys", "create", "soak-metrics", "--role", "metrics", "--data-dir", data)
    run.sim = start_sim(run)
    run.gateway = gateway_process(run).start(60)


def stop(run: Run) -> None:
    for process in (run.gateway, run.sim):
        if process is not None:
            process.stop(30)
    if run.mount is not None and (run.mount / "data").exists():
        subprocess.run(["cp", "-a", str(run.mount / "data"), str(run.dir / "data-copy")], check=False)
    unmount_disk(run)


def raise_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("soak.py mounts a file system for the data folder: run it as root")
    raise_on_sigterm()
    run = Run(args.out_dir / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"), args)
    run.dir.mkdir(parents=True)
    facts = machine_facts(args)
    print(f"soak: {run.dir}", flush=True)
    try:
        start(run)
        results, samples = uvloop.run(drive(run))
    finally:
        stop(run)  # graceful: the gateway seals and compacts its journals
    facts["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = summarize(run, results, samples)
    write_timeline(run.dir / "timeline.csv", samples, results)
    write_requests(run.dir / "requests.csv", results, min((r.due for r in results), default=0.0))
    (run.dir / "results.json").write_text(json.dumps({"facts": facts, "args": {**vars(args), "out_dir": str(args.out_dir)},
                                                      "summary": summary, "samples": [asdict(s) for s in samples]},
                                                     indent=2, default=str))
    text = markdown(summary, run, facts)
    (run.dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
