"""Nothing completed is lost: kill -9 under load, and client disconnects mid-stream."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway
from tests.processes import gateway, simulator

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "I am still waiting on my card?"}]}


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory):
    """A simulator streaming one chunk every 200 ms (a whole answer takes about 2 s)."""
    process = simulator(tmp_path_factory.mktemp("slow-sim"), "--latency-ms", "1", "--latency-sigma", "0",
                        "--token-ms", "200").start()
    yield process
    process.stop()


def dev_gateway(tmp_path, sim) -> Gateway:
    data_dir = tmp_path / "data"
    process = gateway(tmp_path, data_dir, "--dev", "--upstream-url", sim.url + "/v1")
    return Gateway(process, data_dir, key="any", metrics_key="any")


def completed_calls(url: str, stop: threading.Event, done: list[str], stream: bool) -> None:
    """Send requests until stopped or the gateway dies; keep the ids of complete answers."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": stream}) as r:
                    body = r.read()
                if r.status_code == 200 and (not stream or body.endswith(b"data: [DONE]\n\n")):
                    done.append(r.headers["x-arbitrage-request-id"])
            except httpx.HTTPError:
                return


def children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has exited already)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def all_gone(pids: set[int], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(alive(pid) for pid in pids)


def run_load_then_kill(gw: Gateway, seconds: float) -> tuple[list[str], set[int]]:
    stop, done = threading.Event(), []
    threads = [threading.Thread(target=completed_calls, args=(gw.process.url, stop, done, i % 2 == 0))
               for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    compactor = children(gw.process.proc.pid)
    gw.process.kill9()
    stop.set()
    for t in threads:
        t.join(15)
    return done, compactor


def test_kill9_under_load_loses_no_completed_response(tmp_path, sim):
    gw = dev_gateway(tmp_path, sim)
    gw.process.start()
    completed, compactor = run_load_then_kill(gw, seconds=2.0)
    gw.process.start()  # restart on the same data: the dead process's journal is compacted
    gw.process.stop()
    recorded = {r["request_id"] for r in gw.rows("SELECT request_id FROM calls")}
    assert len(completed) > 50
    assert set(completed) <= recorded
    assert not list((gw.data_dir / "calls" / "journal").glob("[!_]*.jsonl"))  # all compacted
    assert compactor and all_gone(compactor)  # the compaction child did not outlive its gateway


def test_client_disconnect_cancels_and_is_recorded(tmp_path, slow_sim):
    gw = dev_gateway(tmp_path, slow_sim)
    gw.process.start()
    try:
        with httpx.Client(base_url=gw.process.url) as client:
            with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                request_id = r.headers["x-arbitrage-request-id"]
                next(r.iter_bytes())
        record = wait_for_record(gw, request_id)
    finally:
        gw.process.stop()
    assert record["error_type"] == "client_disconnected" and record["status_code"] == 499
    assert record["latency_ms"] < 1000  # the whole answer takes about 2 s: the relay stopped early


def wait_for_record(gw: Gateway, request_id: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = gw.rows(f"SELECT * FROM calls WHERE request_id = '{request_id}'")
        if rows:
            return rows[0]
        time.sleep(0.2)
    raise AssertionError(f"no record for {request_id}")


def test_client_leaving_before_the_answer_cancels_the_upstream_call(gw):
    body = {**BODY, "model": "slow", "messages": [{"role": "user", "content": "leave early"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.process.url + "/v1/chat/completions", json=body, timeout=0.5,
                   headers={"Authorization": f"Bearer {gw.key}"})
    deadline = time.monotonic() + 3  # the simulator's slow answer takes 5 s: the record must come first
    while time.monotonic() < deadline:
        rows = gw.rows("SELECT status_code, error_type FROM calls WHERE model = 'slow'")
        if rows:
            break
    assert rows == [{"status_code": 499, "error_type": "client_disconnected"}]
