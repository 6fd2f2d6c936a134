"""Faults a user depends on the gateway to survive, each under concurrent traffic: a full data
disk, an upstream that refuses connections and comes back, 429 storms, 5xx bursts, timeouts and
streams cut off mid-answer. What the client sees, what is recorded, and that nothing answered is
lost. No timing assertions here: rates and latencies are measured by bench/soak.py.

A full disk (decided in issue 7): the gateway keeps answering; a record that cannot be written
is counted (``arbitrage_capture_failures_total``) and logged with its request id, and is not
retried; recording resumes by itself once there is space again, and every record written before
or after is intact. A compaction pass that finds the disk full leaves the journal as it is,
removes its partial Parquet file and is tried again.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway
from tests.processes import ServerProcess, gateway, simulator

CONFIG = """
[[upstreams]]
name = "sim"
base_url = "{sim}/v1"
timeout_s = 2
max_retries = 2
retry_max_wait_s = 0.2

[capture]
segment_max_age_s = 1
compact_interval_s = 0.5
"""
CARD = "I am still waiting on my card?"


def chat(model: str = "gpt-4o-mini", stream: bool = False, text: str = CARD) -> dict:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}


def post_all(gw: Gateway, bodies: list[dict], clients: int = 8) -> list[httpx.Response]:
    """Every body posted to chat completions, ``clients`` at a time; the responses, read whole."""
    with (httpx.Client(base_url=gw.process.url, timeout=30, headers={"Authorization": f"Bearer {gw.key}"},
                       limits=httpx.Limits(max_connections=clients)) as client,
          ThreadPoolExecutor(clients) as pool):
        return list(pool.map(lambda body: client.post("/v1/chat/completions", json=body), bodies))


def ids(responses: list[httpx.Response]) -> list[str]:
    return [r.headers["x-arbitrage-request-id"] for r in responses]


def tally(gw: Gateway) -> dict[tuple, int]:
    """Recorded calls by (model, status, error type)."""
    rows = gw.rows("SELECT model, status_code, error_type, count(*) AS n FROM calls GROUP BY ALL")
    return {(r["model"], r["status_code"], r["error_type"]): r["n"] for r in rows}


def added(before: dict[tuple, int], after: dict[tuple, int]) -> dict[tuple, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def records(gw: Gateway, request_ids: list[str]) -> list[dict]:
    """The calls rows of these requests, in their order; each must be recorded exactly once."""
    quoted = ", ".join(f"'{i}'" for i in request_ids)
    rows = gw.rows(f"SELECT * FROM calls WHERE request_id IN ({quoted})")
    by_id = {row["request_id"]: row for row in rows}
    assert len(rows) == len(by_id) == len(set(request_ids)), "a request recorded twice or not at all"
    return [by_id[i] for i in request_ids]


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """A counter's value summed over the series matching ``labels``."""
    return sum(s.value for f in text_string_to_metric_families(gw.metrics()) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def fault_gateway(tmp: Path, upstream: ServerProcess, data_dir: Path) -> Gateway:
    """A gateway (dev mode, one upstream, quick compaction) of this test's own."""
    config = tmp / "faults.toml"
    config.write_text(CONFIG.format(sim=upstream.url))
    process = gateway(tmp, data_dir, "--dev", config=config).start()
    return Gateway(process, data_dir, key="any", metrics_key="any")


def openai_error(response: httpx.Response) -> dict:
    """The ``error`` object of an answer in OpenAI's error shape."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# A full data disk


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 4 MiB tmpfs of this test's own (needs root, as CI has), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    if subprocess.run(["umount", str(mount)], check=False).returncode:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 8192) -> Path:
    """Fill the disk, then free ``leave`` bytes (so that a record can end up half written)."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def wait_for_log(gw: Gateway, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in gw.process.log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the gateway's log"
        time.sleep(0.2)


def test_full_disk_keeps_answering_and_recording_resumes_when_space_frees(sim, tmp_path, small_disk):
    gw = fault_gateway(tmp_path, sim, small_disk / "data")
    try:
        filler = fill(small_disk)
        during = post_all(gw, [chat(text=f"{CARD} {i} " + "x" * 1500) for i in range(30)])
        failed = metric(gw, "arbitrage_capture_failures_total")
        wait_for_log(gw, "capture compaction failed")  # a sealed segment met the full disk too
        filler.unlink()
        after = post_all(gw, [chat(text=f"{CARD} after {i}") for i in range(10)])
    finally:
        gw.process.stop()  # compacts everything on the freed disk
    log = gw.process.log.read_text()
    assert [r.status_code for r in during + after] == [200] * 40
    assert 0 < failed < 30 and log.count("capture failed for request") == failed
    recorded = {r["request_id"] for r in gw.rows("SELECT request_id FROM calls")}
    assert len(recorded & set(ids(during))) == 30 - failed
    assert set(ids(after)) <= recorded
    assert "unreadable journal lines" not in log  # no half-written record, nor one glued to it
    assert "Traceback" not in log  # a compaction pass that found the disk full is one line, retried


# Upstream refusing connections, then back


def test_upstream_refusing_connections_gives_a_502_then_success(tmp_path):
    upstream = simulator(tmp_path).start()
    gw = fault_gateway(tmp_path, upstream, tmp_path / "data")
    try:
        before = post_all(gw, [chat()] * 8)
        upstream.stop()
        down = post_all(gw, [chat()] * 8 + [chat(stream=True)] * 8)
        upstream.start()
        after = post_all(gw, [chat()] * 8 + [chat(stream=True)] * 8)
    finally:
        gw.process.stop()
        upstream.stop()
    assert [r.status_code for r in before + after] == [200] * 24
    assert [r.status_code for r in down] == [502] * 16
    assert {openai_error(r)["code"] for r in down} == {"upstream_unreachable"}
    assert {r["status_code"] for r in records(gw, ids(before + after))} == {200}
    failed = records(gw, [r.headers["x-arbitrage-request-id"] for r in down])  # the 502 names its record
    assert len(failed) == 16 and {(r["status_code"], r["upstream_attempts"]) for r in failed} == {(502, 3)}
    assert tally(gw) == {("gpt-4o-mini", 200, None): 24, ("gpt-4o-mini", 502, "upstream_unreachable"): 16}


# 429 storms and 5xx bursts (the session gateway: its "faults" upstream retries twice). Model names
# carry ":gpt-4o-mini" so that these records are apart from other tests' ("hang", "cutoff", ...).


def test_429_storm_is_retried_and_the_client_sees_the_upstream_s_429_only_after(gw):
    retried = metric(gw, "arbitrage_upstream_retries_total", reason="429")
    storm = post_all(gw, [chat("error-429:gpt-4o-mini")] * 24)
    assert [r.status_code for r in storm] == [429] * 24
    assert {openai_error(r)["code"] for r in storm} == {"rate_limit_exceeded"}
    assert {r.headers.get("retry-after") for r in storm} == {"1"}
    assert {(r["upstream_attempts"], r["error_type"]) for r in records(gw, ids(storm))} == {(3, "rate_limited")}
    assert metric(gw, "arbitrage_upstream_retries_total", reason="429") - retried == 2 * 24


def test_5xx_burst_only_the_upstream_s_own_errors_reach_clients(gw):
    burst = post_all(gw, [chat("flaky-50:gpt-4o-mini", text=f"{CARD} {i}") for i in range(40)])
    rows = records(gw, ids(burst))
    assert {r.status_code for r in burst} <= {200, 500}
    assert [r["status_code"] for r in rows] == [r.status_code for r in burst]
    assert {r["upstream_attempts"] for r in rows if r["status_code"] == 500} <= {3}
    assert any(r["upstream_attempts"] > 1 for r in rows if r["status_code"] == 200)  # retries rescued some


# Timeouts and cut-off streams, among ordinary traffic


def test_timeouts_are_504s_while_other_calls_are_answered(gw):
    earlier = tally(gw)
    mixed = post_all(gw, [chat("hang:gpt-4o-mini"), chat("slow:gpt-4o-mini"), chat(), chat(stream=True)] * 4, clients=16)
    assert [r.status_code for r in mixed] == [504, 504, 200, 200] * 4
    assert {openai_error(r)["code"] for r in mixed if r.status_code == 504} == {"upstream_timeout"}
    assert {r["status_code"] for r in records(gw, ids(mixed[2::4] + mixed[3::4]))} == {200}
    assert added(earlier, tally(gw)) == {("hang:gpt-4o-mini", 504, "upstream_timeout"): 4, ("slow:gpt-4o-mini", 504, "upstream_timeout"): 4,
                                         ("gpt-4o-mini", 200, None): 8}


def test_streams_cut_off_mid_answer_end_in_an_error_never_a_clean_end(gw):
    earlier = tally(gw)
    mixed = post_all(gw, [chat("cutoff:gpt-4o-mini", stream=True), chat(stream=True), chat("cutoff:gpt-4o-mini")] * 6)
    cut, whole, unary = mixed[0::3], mixed[1::3], mixed[2::3]
    assert all(r.status_code == 200 and "data: [DONE]" not in r.text and "stream_cut_off" in r.text for r in cut)
    assert all(r.text.endswith("data: [DONE]\n\n") for r in whole)
    assert {(r.status_code, openai_error(r)["code"]) for r in unary} == {(502, "upstream_broken")}
    assert {(r["status_code"], r["error_type"]) for r in records(gw, ids(cut))} == {(502, "stream_cut_off")}
    assert added(earlier, tally(gw)) == {("cutoff:gpt-4o-mini", 502, "stream_cut_off"): 6, ("cutoff:gpt-4o-mini", 502, "upstream_broken"): 6,
                                         ("gpt-4o-mini", 200, None): 6}
