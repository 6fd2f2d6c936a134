"""The local route end to end on real parts: the session's vLLM (CPU build) serving a real adapter
(every answer CARD_ARRIVAL), a real gateway with `[local] url` pointing at it, the simulator as
the frontier API (Banking77 gold labels), the official openai client.

Policies are edited live the way the admin API persists them (``RouteTable`` on the gateway's
data dir); the gateway picks each edit up within a second.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from arbitrage.config import load_config
from gateway.ramp_evidence import Counts, RampEvidence, restore_from_store
from gateway.route_table import RouteTable
from tests.conftest import (
    CARD_ARRIVAL,
    INTENTS_PATH,
    INTENTS_PROMPT,
    RoutedGateway,
    banking77,
    routed_gateway,
)
from tests.processes import arbitrage

CARDS = banking77("card_arrival")
OTHERS = banking77(other_than="card_arrival", every=97)


@pytest.fixture(scope="module")
def routed(sim, vllm, intents_adapter, tmp_path_factory) -> RoutedGateway:
    running = routed_gateway(tmp_path_factory.mktemp("routed"), sim, vllm, intents_adapter)
    yield running
    running.process.stop()


def client(process) -> openai.OpenAI:
    return openai.OpenAI(base_url=process.url + "/v1", api_key="dev", max_retries=0, timeout=120)


def records(data_dir: Path, where: str = "true") -> list[dict]:
    out = arbitrage("sql", f"SELECT * FROM calls WHERE path = '{INTENTS_PATH}' AND {where} ORDER BY ts",
                    "--json", "--data-dir", str(data_dir))
    return json.loads(out.stdout)


def shadow_rows(data_dir: Path) -> list[dict]:
    out = arbitrage("sql", "SELECT * FROM shadow ORDER BY ts", "--json", "--data-dir", str(data_dir))
    return json.loads(out.stdout)


def test_local_mode_serves_every_request_locally_json_and_stream(routed):
    process, data_dir, ask, set_policy = routed.process, routed.data_dir, routed.ask, routed.set_policy
    set_policy(mode="local", share=100, threshold=0.0, output="json", audit_rate=0.0, shadow_rate=0.0)
    raw = ask(OTHERS[0])
    assert raw.headers["x-arbitrage-served-by"] == "local"
    completion = raw.parse()
    assert completion.choices[0].message.content == CARD_ARRIVAL and completion.model == "gpt-4o-mini"
    assert completion.choices[0].logprobs is None, "log-probs are not returned unless asked for"
    chunks = list(client(process).chat.completions.create(
        model="gpt-4o-mini", temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Arbitrage-Path": INTENTS_PATH},
        messages=[{"role": "system", "content": INTENTS_PROMPT}, {"role": "user", "content": OTHERS[1]}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CARD_ARRIVAL
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    ids = (raw.headers["x-arbitrage-request-id"], _last_request_id(data_dir))
    [first, second] = records(data_dir, f"request_id IN ('{ids[0]}', '{ids[1]}')")
    for record in (first, second):
        assert (record["served_by"], record["adapter"], record["upstream"]) == ("local", f"{INTENTS_PATH}/v1", "local")
        assert record["cost_usd"] == 0.0 and record["counterfactual_cost_usd"] > 0
        assert 0 < record["confidence"] <= 1 and record["local_latency_ms"] > 0
    metrics = client_metrics(process)
    assert f'arbitrage_saved_usd_total{{path="{INTENTS_PATH}"}}' in metrics


def _last_request_id(data_dir: Path) -> str:
    return records(data_dir)[-1]["request_id"]


def client_metrics(process) -> str:
    return httpx.get(f"{process.url}/metrics", headers={"Authorization": "Bearer dev"}, timeout=10).text


def test_unreachable_threshold_falls_back_upstream_inside_the_same_request(routed):
    process, data_dir, ask, set_policy = routed.process, routed.data_dir, routed.ask, routed.set_policy
    set_policy(mode="local", share=100, threshold=1.0, output="json", audit_rate=0.0, shadow_rate=0.0)
    raw = ask(OTHERS[2])
    assert raw.headers.get("x-arbitrage-served-by") is None
    assert raw.parse().choices[0].message.content != CARD_ARRIVAL, "the simulator's gold label came back"
    [record] = records(data_dir, f"request_id = '{raw.headers['x-arbitrage-request-id']}'")
    assert (record["served_by"], record["route_reason"], record["upstream"]) == ("fallback", "low_confidence", "sim")
    assert record["confidence"] < 1.0 and record["cost_usd"] > 0
    assert 'arbitrage_fallbacks_total{path="support/intents",reason="low_confidence"}' in client_metrics(process)


def test_share_zero_and_a_statistical_share(routed):
    data_dir, ask, set_policy = routed.data_dir, routed.ask, routed.set_policy
    set_policy(mode="canary", share=0.0, threshold=0.0, output="json", audit_rate=0.0, shadow_rate=0.0)
    ids = [ask(t).headers["x-arbitrage-request-id"] for t in OTHERS[3:13]]
    served = {r["request_id"]: r["served_by"] for r in records(data_dir)}
    assert [served[i] for i in ids] == ["upstream"] * 10
    set_policy(mode="canary", share=50.0, threshold=0.0, output="json", audit_rate=0.0, shadow_rate=0.0)
    ids = [ask(t).headers["x-arbitrage-request-id"] for t in OTHERS[13:53]]
    served = {r["request_id"]: r["served_by"] for r in records(data_dir)}
    local = sum(served[i] == "local" for i in ids)
    assert 8 <= local <= 32, f"{local} of 40 served locally at a 50% share (binomial 99.9% band: 8-32)"


def test_shadow_mode_compares_in_the_background_and_the_ramp_moves_on_evidence(routed):
    data_dir, ask, set_policy = routed.data_dir, routed.ask, routed.set_policy
    ramp = {"steps": [50.0, 100.0], "target": 0.4, "floor": 0.35, "min_samples": 3, "window": 50}
    set_policy(mode="shadow", share=0.0, threshold=0.0, output="json", shadow_rate=1.0, audit_rate=1.0,
               comparator={"name": "json"}, ramp=ramp)
    before = len(shadow_rows(data_dir))
    for text in CARDS[:3]:  # the simulator answers card_arrival: the adapter agrees
        assert ask(text).headers.get("x-arbitrage-served-by") is None, "shadow mode serves upstream"
    rows = _wait_for(lambda: shadow_rows(data_dir)[before:], 3)
    assert [(r["kind"], r["agreed"], r["local_answer"], r["local_reason"]) for r in rows] == \
        [("shadow", True, CARD_ARRIVAL, "confident")] * 3
    policy = _wait_for_policy(data_dir, lambda p: p.mode == "canary")
    assert policy.share == 50.0, "3 of 3 agreeing (Wilson lower bound 0.44 >= 0.4) raised the share one step"
    for text in OTHERS[60:80]:  # now every comparison disagrees: the ramp rolls back to shadow
        ask(text)
        if RouteTable(load_config(routed.config, data_dir=str(data_dir))).get(INTENTS_PATH).mode == "shadow":
            break
    policy = _wait_for_policy(data_dir, lambda p: p.mode == "shadow")
    assert policy.share == 0.0
    changes = json.loads(arbitrage("sql", "SELECT actor, action, mode_before, mode_after FROM route_changes "
                                   "WHERE actor = 'ramp' ORDER BY ts", "--json", "--data-dir", str(data_dir)).stdout)
    assert [(c["action"], c["mode_after"]) for c in changes] == [("raise", "canary"), ("rollback", "shadow")]
    calibration = routed.route_status()["calibration"]
    assert calibration["samples"] >= 3 and calibration["target"] == 0.4
    disagreements = [r for r in shadow_rows(data_dir) if r["agreed"] is False]
    assert disagreements and all(r["upstream_answer"] != r["local_answer"] for r in disagreements)
    shown = _shown_disagreements(routed, 3)
    assert shown["total"] == len(disagreements) and len(shown["shown"]) == min(3, len(disagreements))
    confidences = [r["confidence"] for r in shown["shown"]]
    assert confidences == sorted(confidences, reverse=True)
    assert confidences[0] == max(r["confidence"] for r in disagreements)
    assert all(r["input"] in OTHERS[60:80] and r["local_answer"] == CARD_ARRIVAL for r in shown["shown"])
    assert {r["kind"] for r in shadow_rows(data_dir)} >= {"shadow"}


def test_a_reviewed_upstream_mistake_counts_in_the_ramps_evidence_at_once(routed):
    data_dir, ask = routed.data_dir, routed.ask
    ramp = {"steps": [50.0, 100.0], "target": 0.5, "floor": 0.05, "min_samples": 4, "window": 50}
    routed.set_policy(mode="shadow", share=0.0, threshold=0.0, output="json", shadow_rate=1.0,
                      comparator={"name": "json"}, ramp=ramp)
    before = len(shadow_rows(data_dir))
    for text in CARDS[20:22] + OTHERS[0:2]:  # the adapter answers card_arrival: 2 agree, 2 disagree
        ask(text)
    rows = _wait_for(lambda: shadow_rows(data_dir)[before:], 4)
    disagreed = [r["shadow_id"] for r in rows if r["agreed"] is False]
    assert len(disagreed) == 2 and routed.route_status()["evidence"]["n"] == 4

    def review(shadow_id: str) -> str:
        return arbitrage("route", "review", INTENTS_PATH, shadow_id, "--verdict", "upstream_wrong",
                         "--url", routed.process.url, "--admin-key", "dev").stdout

    assert "ramp evidence now 3/4, lower 0.301 (target 0.5)" in review(disagreed[0]), "3 of 4: under the target"
    assert routed.route_status()["policy"]["mode"] == "shadow"
    assert "ramp evidence now none yet" in review(disagreed[1]), "4 of 4 raised the share: a new policy's evidence"
    assert (routed.route_status()["policy"]["mode"], routed.route_status()["policy"]["share"]) == ("canary", 50.0)
    changes = json.loads(arbitrage("sql", "SELECT evidence FROM route_changes WHERE actor = 'ramp' "
                                   "ORDER BY ts DESC LIMIT 1", "--json", "--data-dir", str(data_dir)).stdout)
    assert {k: json.loads(changes[0]["evidence"])[k] for k in ("n", "agreed")} == {"n": 4, "agreed": 4}


def test_a_shadow_answer_that_fails_the_output_check_is_recorded_but_never_counted_in_the_ramp(routed):
    """The ramp counts answers the route would serve; the ``local_reason`` column records which those
    were, so the evidence rebuilt at a restart leaves the others out too, and so does the calibration."""
    data_dir = routed.data_dir
    ramp = {"steps": [50.0, 100.0], "target": 0.3, "floor": 0.05, "min_samples": 2, "window": 50}
    routed.set_policy(mode="shadow", share=0.0, threshold=0.0, output="json", shadow_rate=1.0,
                      json_schema={"type": "object", "required": ["label"]}, comparator={"name": "json"}, ramp=ramp)
    before = len(shadow_rows(data_dir))
    calibrated = routed.route_status()["calibration"]["samples"]
    try:
        for text in CARDS[22:24]:  # upstream and the adapter both answer card_arrival, without a "label" key
            routed.ask(text)
        rows = _wait_for(lambda: shadow_rows(data_dir)[before:], 2)
        assert [(r["agreed"], r["local_reason"]) for r in rows] == [(True, "invalid_output")] * 2
        status = routed.route_status()
        assert (status["policy"]["mode"], status.get("evidence", {}).get("n", 0)) == ("shadow", 0)
        assert status["calibration"]["samples"] == calibrated, \
            "answers the route never serves say nothing of its threshold"
        table = RouteTable(load_config(routed.config, data_dir=str(data_dir)))
        rebuilt = RampEvidence()
        restore_from_store(rebuilt, table, data_dir)
        assert rebuilt.counts(INTENTS_PATH, table.revision(INTENTS_PATH)) == Counts(0, 0), \
            "agreeing answers above the threshold, but not ones the route serves"
    finally:  # the later tests of this module edit the same policy (edits are merged): no schema for them
        routed.set_policy(json_schema=None)


def test_two_workers_ramp_once_on_their_comparisons_together(sim, vllm, intents_adapter, tmp_path):
    """With ``--workers 2`` the ramp counts every worker's comparisons in one window: min_samples
    comparisons in all raise the share (each worker counting its own would need min_samples each),
    once, and both workers report the same evidence."""
    routed = routed_gateway(tmp_path, sim, vllm, intents_adapter, "--workers", "2")
    try:
        ramp = {"steps": [50.0, 100.0], "target": 0.4, "floor": 0.35, "min_samples": 8, "window": 50}
        routed.set_policy(mode="shadow", share=0.0, threshold=0.0, output="json", shadow_rate=1.0, audit_rate=1.0,
                          comparator={"name": "json"}, ramp=ramp)
        time.sleep(1.5)  # both workers have re-read routes.json (each does every second)
        with ThreadPoolExecutor(4) as clients:  # on fresh connections, so both workers take requests
            answers = list(clients.map(routed.ask, CARDS[10:18]))
        assert all(a.headers.get("x-arbitrage-served-by") is None for a in answers), "shadow mode serves upstream"
        policy = _wait_for_policy(routed.data_dir, lambda p: p.mode == "canary")
        assert policy.share == 50.0
        changes = json.loads(arbitrage("sql", "SELECT action, evidence FROM route_changes WHERE actor = 'ramp'",
                                       "--json", "--data-dir", str(routed.data_dir)).stdout)
        assert [(c["action"], json.loads(c["evidence"])["n"]) for c in changes] == [("raise", 8)]
        assert len(_wait_for(lambda: shadow_rows(routed.data_dir), 8)) == 8
        with ThreadPoolExecutor(2) as clients:  # at canary 50 %: each compared (shadow) or audited, by either worker
            list(clients.map(routed.ask, CARDS[18:20]))
        assert len(_wait_for(lambda: shadow_rows(routed.data_dir), 10)) == 10
        reports = [routed.route_status().get("evidence", {}).get("n") for _ in range(6)]
        assert reports == [2] * 6, "every answer of the admin API, whichever worker gives it, counts both"
        shown = arbitrage("route", "show", "--url", routed.process.url, "--admin-key", "dev").stdout
        assert "2/2, lower 0.342 (needs 8)" in shown, shown
        metrics = client_metrics(routed.process)
        assert f'arbitrage_ramp_samples{{path="{INTENTS_PATH}"}} 2.0' in metrics, "the dashboard's ramp evidence"
    finally:
        routed.process.stop()


def _shown_disagreements(routed, count: int) -> dict:
    reply = httpx.get(f"{routed.process.url}/admin/routes/{INTENTS_PATH}", params={"disagreements": count},
                      headers={"Authorization": "Bearer dev"}, timeout=10)
    return reply.json()["status"]["disagreements"]


def _wait_for(fetch, count: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = fetch()
        if len(rows) >= count:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"expected {count} rows, have {len(fetch())}")


def _wait_for_policy(data_dir: Path, condition, timeout: float = 60):
    config = data_dir.parent / "arbitrage.toml"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        policy = RouteTable(load_config(config, data_dir=str(data_dir))).get(INTENTS_PATH)
        if policy is not None and condition(policy):
            return policy
        time.sleep(0.5)
    raise AssertionError(f"the policy never changed as expected: {policy}")


def test_vllm_killed_under_load_no_client_sees_an_error_and_serving_resumes_after_restart(routed, vllm):
    """kill -9 of vLLM mid-load: every request still answered (upstream); vLLM back: the gateway
    loads the adapter again by itself and local serving resumes. (Runs last: it restarts the
    session's vLLM.)"""
    data_dir, ask, set_policy = routed.data_dir, routed.ask, routed.set_policy
    set_policy(mode="local", share=100, threshold=0.0, output="json", audit_rate=0.0, shadow_rate=0.0,
               local_timeout_s=120.0)  # a busy machine must not turn the first local answers into timeouts
    stop, errors, answered = threading.Event(), [], []

    def load(offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                raw = ask(OTHERS[i % len(OTHERS)])
                answered.append((time.monotonic(), raw.headers.get("x-arbitrage-served-by") or "upstream"))
            except Exception as exc:  # noqa: BLE001 - any client-visible failure is what this test looks for
                errors.append(exc)
            i += 4
            time.sleep(0.05)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        _until(lambda: sum(s == "local" for _, s in answered) >= 5, "local answers before the kill")
        os.killpg(vllm.process.pid, signal.SIGKILL)
        vllm.process.wait(timeout=30)
        killed_at = time.monotonic()
        _until(lambda: sum(t > killed_at + 3 and s == "upstream" for t, s in answered) >= 10,
               "upstream answers while vLLM is down")
        vllm.start()
        restarted_at = time.monotonic()
        _until(lambda: any(t > restarted_at and s == "local" for t, s in answered), "local answers after the restart",
               timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    reasons = {r["route_reason"] for r in records(data_dir, "served_by = 'fallback'")}
    assert reasons & {"local_unreachable", "local_error", "local_timeout"}, reasons
    down = records(data_dir, "route_reason = 'local_unavailable'")
    assert down and all(r["served_by"] == "upstream" and r["status_code"] == 200 for r in down)


def _until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
