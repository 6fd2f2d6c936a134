"""Several workers behind one port (``serve --workers``): every request recorded exactly once, each
worker with its own journal, /metrics summed over all workers whichever answers, a new key seen by
every worker, one rate limit and one budget per key for all workers, and a killed worker replaced by
uvicorn's supervisor with nothing completed lost."""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from arbitrage.config import load_config
from arbitrage.errors import ConfigError
from tests.conftest import UPSTREAM_KEY, Gateway
from tests.processes import ServerProcess, arbitrage, gateway
from tests.test_durability import alive, all_gone, children

CONFIG = """
[gateway]
workers = 2

[[upstreams]]
name = "sim"
base_url = "{sim}/v1"

[capture]
segment_max_age_s = 1
compact_interval_s = 0.5
"""
MESSAGES = [{"role": "user", "content": "I am still waiting on my card?"}]


def start_workers(tmp: Path, sim, *extra: str) -> Gateway:
    data_dir = tmp / "data"
    key = arbitrage("keys", "create", "tests", "--data-dir", str(data_dir)).stdout.strip()
    config = tmp / "arbitrage.toml"
    config.write_text(CONFIG.format(sim=sim.url))
    metrics_key = arbitrage("keys", "create", "prometheus", "--role", "metrics", "--data-dir", str(data_dir)).stdout
    process = gateway(tmp, data_dir, *extra, config=config, env={"OPENAI_API_KEY": UPSTREAM_KEY}).start()
    gw = Gateway(process, data_dir, key, metrics_key.strip())
    try:
        wait_for(lambda: len(workers(gw)) == 2)
    except AssertionError:
        process.stop()
        raise
    return gw


def workers(gw: Gateway) -> set[int]:
    """The worker processes uvicorn's supervisor runs (not its multiprocessing resource tracker)."""
    return {pid for pid in children(gw.process.proc.pid) if alive(pid) and b"spawn_main" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def one_call(client: openai.OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    return raw.headers["x-arbitrage-request-id"]


def send(gw: Gateway, requests: int, clients: int = 8) -> list[str]:
    """Request ids of ``requests`` calls from ``clients`` concurrent clients (each its own connections)."""
    pool = [gw.client() for _ in range(clients)]
    with ThreadPoolExecutor(clients) as executor:
        return list(executor.map(lambda i: one_call(pool[i % clients]), range(requests)))


def requests_total(gw: Gateway) -> float:
    """``arbitrage_requests_total`` summed over its series, scraped on a new connection."""
    family = next(f for f in text_string_to_metric_families(gw.metrics()) if f.name == "arbitrage_requests")
    return sum(s.value for s in family.samples if s.name == "arbitrage_requests_total")


def writer_pids(data_dir: Path) -> set[int]:
    """Processes that wrote capture segments (``<time>-<host>-<pid>-<id>``, compacted or not)."""
    names = [p.stem for d in ("journal", "parquet") for p in (data_dir / "calls" / d).glob("[!_]*.*")]
    return {int(name.rsplit("-", 2)[1]) for name in names}


def recorded_once(gw: Gateway) -> dict[str, int]:
    rows = gw.rows("SELECT request_id, count(*) AS n FROM calls GROUP BY request_id")
    return {row["request_id"]: row["n"] for row in rows}


@pytest.fixture(scope="module")
def two_workers(sim, tmp_path_factory) -> Gateway:
    gw = start_workers(tmp_path_factory.mktemp("workers"), sim)
    yield gw
    gw.process.stop()


@pytest.fixture(scope="module")
def traffic(two_workers) -> list[str]:
    return send(two_workers, 80)


def test_worker_count_is_checked():
    with pytest.raises(ConfigError, match="gateway.workers must be 1-64, got 0"):
        load_config(None, workers=0)


def test_every_request_is_recorded_exactly_once(two_workers, traffic):
    counts = recorded_once(two_workers)
    assert set(traffic) <= set(counts) and {counts[r] for r in traffic} == {1}


def test_each_worker_writes_its_own_journal(two_workers, traffic):
    assert len(writer_pids(two_workers.data_dir)) == 2


def test_metrics_count_every_worker_s_requests_whichever_answers(two_workers, traffic):
    # Both workers served part of the traffic (previous test), so a scrape that showed one
    # worker's counts alone would come out short.
    recorded = len(recorded_once(two_workers))
    assert [requests_total(two_workers) for _ in range(12)] == [recorded] * 12


def test_a_key_created_while_serving_works_on_every_worker(two_workers):
    key = arbitrage("keys", "create", "late-app", "--data-dir", str(two_workers.data_dir)).stdout.strip()
    time.sleep(1.5)  # each worker re-reads the key file at most once a second
    clients = [openai.OpenAI(base_url=two_workers.base_url, api_key=key, max_retries=0) for _ in range(8)]
    with ThreadPoolExecutor(8) as executor:
        assert len(list(executor.map(one_call, clients * 3))) == 24


def statuses(gw: Gateway, key: str, requests: int, clients: int) -> list[int]:
    """HTTP statuses of ``requests`` calls with ``key``, each on a fresh connection (so the workers
    share them), from ``clients`` threads."""
    def status(_) -> int:
        return httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                          json={"model": "gpt-4o-mini", "messages": MESSAGES}).status_code

    with ThreadPoolExecutor(clients) as executor:
        return list(executor.map(status, range(requests)))


def test_a_key_has_one_rate_limit_and_one_budget_for_all_workers(two_workers):
    data_dir = str(two_workers.data_dir)
    rpm = arbitrage("keys", "create", "rpm-app", "--rpm", "10", "--data-dir", data_dir).stdout.strip()
    tiny = arbitrage("keys", "create", "tiny-app", "--budget-usd-day", "0.0000001", "--data-dir", data_dir).stdout.strip()
    time.sleep(1.5)  # each worker re-reads the key file at most once a second
    started = time.monotonic()
    answered = statuses(two_workers, rpm, 40, clients=8)
    refilled = (time.monotonic() - started) * 10 / 60
    assert set(answered) == {200, 429}
    assert 10 <= answered.count(200) <= 10 + refilled, f"{answered.count(200)} answered at 10 rpm (one bucket per worker: 20)"
    answered = statuses(two_workers, tiny, 12, clients=1)
    assert answered == [200] + [429] * 11, "the first call spent the day's budget on every worker"


def load(gw: Gateway, stop: threading.Event, done: list[str], failed: list[str]) -> None:
    """Calls until stopped, on fresh connections; ids of completed answers, errors counted."""
    headers = {"Authorization": f"Bearer {gw.key}"}
    while not stop.is_set():
        try:
            r = httpx.post(gw.base_url + "/chat/completions", headers=headers, timeout=10,
                           json={"model": "gpt-4o-mini", "messages": MESSAGES})
            (done if r.status_code == 200 else failed).append(r.headers.get("x-arbitrage-request-id", ""))
        except httpx.HTTPError as exc:
            failed.append(repr(exc))


def test_killed_worker_is_replaced_and_nothing_completed_is_lost(sim, tmp_path):
    gw = start_workers(tmp_path, sim, "--workers", "2")
    stop, done, failed = threading.Event(), [], []
    threads = [threading.Thread(target=load, args=(gw, stop, done, failed)) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    victim = min(workers(gw))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(workers(gw)) == 2 and victim not in workers(gw))
    before_restart = len(done)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(15)
    try:
        assert len(done) > before_restart, "no request completed after the restart"
        counts = recorded_once(gw)
        assert set(done) <= set(counts) and {counts[r] for r in done} == {1}
        assert requests_total(gw) >= len(done)  # the dead worker's counts stay in the sums
    finally:
        gw.process.stop()


def test_metrics_folder_is_removed_when_the_gateway_stops(sim, tmp_path):
    gw = start_workers(tmp_path, sim)
    pattern = f"{tempfile.gettempdir()}/arbitrage-metrics-{gw.process.proc.pid}-*"
    assert len(glob.glob(pattern)) == 1
    gw.process.stop()
    assert glob.glob(pattern) == []


def test_workers_of_a_killed_supervisor_stop_and_the_gateway_starts_again(sim, tmp_path):
    gw = start_workers(tmp_path, sim)
    sent, pids = send(gw, 20), workers(gw)
    gw.process.kill9()
    assert all_gone(pids), "workers outlived their supervisor and hold the port"
    again = ServerProcess(gw.process.args, gw.process.port, gw.process.log, env=gw.process.env).start()
    try:
        counts = recorded_once(gw)
        assert {counts[r] for r in sent} == {1} and len(send(gw, 4)) == 4
    finally:
        again.stop()
