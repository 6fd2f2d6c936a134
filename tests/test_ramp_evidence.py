"""The ramp's evidence per policy revision, in memory and shared by workers; two gateway workers'
ramps on one path deciding once, on all their comparisons together (no server: the routers' ramp
step is fed comparison outcomes as the background comparisons feed it); and the evidence rebuilt
from the capture store when a gateway starts (one worker or two)."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from arbitrage.capture.location import PARQUET_DIR
from arbitrage.capture.store import CaptureStore
from arbitrage.config import Config, GatewaySettings, LocalSettings
from arbitrage.errors import StoreError
from gateway.local import LocalBackend
from gateway.metrics import Metrics
from gateway.ramp_evidence import Counts, RampEvidence, restore_from_store
from gateway.route_table import ROUTES_FILE, RouteTable
from gateway.routing import Router
from router.policy import RoutePolicy
from tests.processes import at_once, gateway

PATH = "support/intents"
_ids = iter(range(10**9))


def next_id() -> str:
    """A comparison id, as the shadow table's."""
    return f"s{next(_ids)}"


@pytest.fixture(params=["memory", "shared"])
def evidence(request, tmp_path):
    made = RampEvidence() if request.param == "memory" else RampEvidence(tmp_path / "ramp.sqlite")
    yield made
    made.close()


def test_the_last_window_outcomes_of_the_revision_count(evidence):
    for agreed in [False, False, True, True, True]:
        last = evidence.add(PATH, "r1", next_id(), agreed, window=3)
    assert last == Counts(3, 3), "the two early disagreements slid out of a window of 3"
    assert evidence.counts(PATH, "r1") == Counts(3, 3)
    assert evidence.counts("other/path", "r1") == Counts(0, 0)


def test_the_running_counts_match_the_window_recounted(evidence):
    rng = random.Random(7)
    outcomes = [rng.random() < p for p in [0.9] * 120 + [0.3] * 80]
    assert 0 < sum(outcomes) < len(outcomes)
    for i, agreed in enumerate(outcomes):
        last = outcomes[max(0, i - 16):i + 1]  # the reference: the last 17 outcomes, recounted
        assert evidence.add(PATH, "r1", next_id(), agreed, window=17) == Counts(len(last), sum(last))


def test_a_new_revision_starts_afresh_and_forget_keeps_only_the_current_one(evidence):
    evidence.add(PATH, "r1", next_id(), True, window=10)
    assert evidence.add(PATH, "r2", next_id(), False, window=10) == Counts(1, 0)
    evidence.forget(PATH, keep="r2")
    assert evidence.counts(PATH, "r1") == Counts(0, 0)
    assert evidence.counts(PATH, "r2") == Counts(1, 0)
    evidence.forget(PATH, keep="r3")
    assert evidence.counts(PATH, "r2") == Counts(0, 0)


def test_a_verdict_counts_as_the_calibration_counts_it_while_the_comparison_is_in_the_window(evidence):
    wrong, right = next_id(), next_id()
    evidence.add(PATH, "r1", wrong, False, window=3)
    evidence.add(PATH, "r1", right, True, window=3)
    assert evidence.overrule(PATH, wrong, upstream_wrong=True) == ("r1", Counts(2, 2)), "the local answer was right"
    assert evidence.overrule(PATH, wrong, upstream_wrong=True) == ("r1", Counts(2, 2)), "the same verdict again"
    assert evidence.overrule(PATH, wrong, upstream_wrong=False) == ("r1", Counts(2, 1)), "a later verdict undoes it"
    assert evidence.overrule(PATH, right, upstream_wrong=False) == ("r1", Counts(2, 1)), "agreed stays agreed"
    assert evidence.overrule(PATH, "s-unknown", upstream_wrong=True) is None
    assert evidence.overrule("other/path", wrong, upstream_wrong=True) is None
    evidence.overrule(PATH, wrong, upstream_wrong=True)
    for _ in range(3):
        evidence.add(PATH, "r1", next_id(), False, window=3)
    assert evidence.counts(PATH, "r1") == Counts(3, 0), "the overruled outcome left the window with its verdict"
    assert evidence.overrule(PATH, wrong, upstream_wrong=True) is None


def test_workers_add_to_one_window(tmp_path):
    first, second = RampEvidence(tmp_path / "ramp.sqlite"), RampEvidence(tmp_path / "ramp.sqlite")
    first.add(PATH, "r1", next_id(), True, window=100)
    assert second.add(PATH, "r1", next_id(), False, window=100) == Counts(2, 1)
    assert first.counts(PATH, "r1") == Counts(2, 1)


def _add_outcomes(path: str, count: int, start, queue) -> None:
    evidence = RampEvidence(Path(path))
    start.wait()
    for i in range(count):
        evidence.add(PATH, "r1", next_id(), i % 2 == 0, window=100_000)
    queue.put("done")


def test_processes_adding_at_once_lose_no_outcome(tmp_path):
    path = tmp_path / "ramp.sqlite"
    RampEvidence(path).close()
    at_once(_add_outcomes, str(path), 300)
    assert RampEvidence(path).counts(PATH, "r1") == Counts(900, 450), "a lost update would count fewer"


def test_an_unusable_file_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="the ramp's evidence"):
        RampEvidence(tmp_path / "missing" / "ramp.sqlite")


# --- two workers' routers on one path -------------------------------------------------------------

RAMP = {"steps": [5.0, 50.0, 100.0], "target": 0.5, "floor": 0.1, "min_samples": 10, "window": 100}


class Worker:
    """What one gateway worker holds for the ramp: its own route table on the shared data dir, its
    evidence, and the router whose background comparisons feed it."""

    def __init__(self, data_dir: Path, evidence) -> None:
        self.changes = []
        self.table = RouteTable(Config(gateway=GatewaySettings(data_dir=str(data_dir))), on_change=self.changes.append)
        metrics = Metrics()  # vLLM, the proxy, the store and the background queue play no part in the ramp step
        self.router = Router(self.table, LocalBackend(LocalSettings(), metrics), None, None, None, metrics, None,
                             evidence)

    def gauge(self, name: str) -> float:
        """A gauge of this worker's metrics for the path."""
        return self.router.metrics.registry.get_sample_value(name, {"path": PATH})

    def evidence(self) -> int:
        """How many comparisons ``route show`` reports as the ramp's evidence, through this worker."""
        return self.router.status(PATH).get("evidence", {"n": 0})["n"]

    def compared(self, agreed: bool) -> str:
        """A background comparison under the policy this worker has in force finished; its id."""
        shadow_id = next_id()
        self.router._ramp_evidence(PATH, self.table.get(PATH), shadow_id, agreed)
        return shadow_id


def start_shadow(data_dir: Path) -> None:
    RouteTable(Config(gateway=GatewaySettings(data_dir=str(data_dir)))).set(
        PATH, RoutePolicy(mode="shadow", adapter="v1", ramp=RAMP), actor="test", reason="test")


def ramp_raises(data_dir: Path) -> list[dict]:
    routes = json.loads((data_dir / ROUTES_FILE).read_text())["routes"][PATH]
    return [entry for entry in routes["history"] if entry["actor"] == "ramp"]


def test_two_workers_raise_once_on_their_comparisons_together(tmp_path):
    start_shadow(tmp_path)
    evidence = tmp_path / "ramp.sqlite"
    one, two = Worker(tmp_path, RampEvidence(evidence)), Worker(tmp_path, RampEvidence(evidence))
    for _ in range(5):
        one.compared(True)
        two.compared(True)
    policy = RouteTable(Config(gateway=GatewaySettings(data_dir=str(tmp_path)))).get(PATH)
    assert (policy.mode, policy.share) == ("canary", 5.0), "10 agreeing comparisons in all reach min_samples"
    [change] = one.changes + two.changes
    assert (change.actor, change.action, change.evidence["n"], change.evidence["agreed"]) == ("ramp", "raise", 10, 10)
    # The worker that did not raise has not re-read routes.json yet: its comparisons still count under
    # the old policy (11 of them now), and its ramp's decision on them must not raise the share again.
    stale = two if change in one.changes else one
    stale.compared(True)
    assert len(ramp_raises(tmp_path)) == 1 and len(one.changes + two.changes) == 1
    raiser = one if stale is two else two
    assert raiser.gauge("arbitrage_ramp_samples") == 0 and math.isnan(raiser.gauge("arbitrage_agreement_ratio")), \
        "the dashboard shows a gap, not the shadow policy's agreement"
    stale.table.refresh()  # as every worker does each second
    assert (one.evidence(), two.evidence()) == (0, 0), "the canary policy's evidence starts afresh"
    stale.compared(True)
    assert (one.evidence(), two.evidence()) == (1, 1), "both workers report the one comparison"
    assert (stale.gauge("arbitrage_ramp_samples"), stale.gauge("arbitrage_agreement_ratio")) == (1, 1.0)
    assert one.router.status(PATH)["evidence"]["ramp"] == "too_few_samples"


def test_a_decision_on_a_policy_another_worker_changed_meanwhile_is_dropped(tmp_path):
    """Two workers deciding at the same moment, each on enough evidence (here each its own): the one
    whose route table is behind writes nothing, so the share goes up one step, not two."""
    start_shadow(tmp_path)
    one, two = Worker(tmp_path, RampEvidence()), Worker(tmp_path, RampEvidence())
    for _ in range(10):
        one.compared(True)
    for _ in range(10):
        two.compared(True)
    assert [c.action for c in one.changes] == ["raise"] and two.changes == []
    assert len(ramp_raises(tmp_path)) == 1
    policy = RouteTable(Config(gateway=GatewaySettings(data_dir=str(tmp_path)))).get(PATH)
    assert (policy.mode, policy.share) == ("canary", 5.0)


def test_workers_each_with_their_own_evidence_would_not_have_raised(tmp_path):
    """The same comparisons, counted per worker as before the shared evidence: 5 each, below min_samples."""
    start_shadow(tmp_path)
    one, two = Worker(tmp_path, RampEvidence()), Worker(tmp_path, RampEvidence())
    for _ in range(5):
        one.compared(True)
        two.compared(True)
    assert RouteTable(Config(gateway=GatewaySettings(data_dir=str(tmp_path)))).get(PATH).mode == "shadow"


def test_a_comparison_made_under_an_earlier_policy_is_no_evidence(tmp_path):
    start_shadow(tmp_path)
    worker = Worker(tmp_path, RampEvidence())
    before = worker.table.get(PATH)
    worker.table.update(PATH, {"threshold": 0.7}, actor="admin", reason="test")
    worker.router._ramp_evidence(PATH, before, next_id(), True)
    assert worker.evidence() == 0
    worker.compared(True)
    assert worker.evidence() == 1


def test_a_review_counts_in_the_ramps_window_and_the_ramp_decides_on_it_at_once(tmp_path):
    start_shadow(tmp_path)
    worker = Worker(tmp_path, RampEvidence())
    ids = [worker.compared(agreed) for agreed in [False] * 3 + [True] * 7]
    assert worker.table.get(PATH).mode == "shadow", "7 of 10 agreeing: the lower bound stays under 0.5"
    assert worker.router.status(PATH)["evidence"]["ramp"] == "within_bounds", "what route show says it waits for"
    assert worker.router.review_evidence(PATH, ids[0], "upstream_wrong") is True
    assert worker.table.get(PATH).mode == "shadow"
    assert worker.router.review_evidence(PATH, ids[1], "ambiguous") is True, "in the window, counted as judged"
    assert worker.router.review_evidence(PATH, ids[1], "upstream_wrong") is True
    [raised] = worker.changes
    assert (raised.action, raised.evidence["n"], raised.evidence["agreed"]) == ("raise", 10, 9)
    assert worker.table.get(PATH).mode == "canary"
    assert worker.router.review_evidence(PATH, ids[2], "upstream_wrong") is False, "the raise started a new window"


# --- rebuilt from the capture store at start ------------------------------------------------------

def stored_history(data_dir: Path, store: CaptureStore) -> str:
    """A canary policy of adapter v1 (threshold 0.8, window 4) put in force by a recorded change, and
    comparisons around it; the revision."""
    now = datetime.now(UTC)

    def compared(shadow_id: str, seconds: float, confidence: float, agreed: bool | None, kind: str = "shadow",
                 adapter: str = f"{PATH}/v1", local_reason: str | None = None) -> None:
        """A comparison; ``local_reason`` None as in rows written before that column existed."""
        store.append("shadow", {"shadow_id": shadow_id, "ts": now + timedelta(seconds=seconds), "path": PATH,
                                "adapter": adapter, "kind": kind, "confidence": confidence, "agreed": agreed,
                                "local_reason": local_reason})

    compared("before", -60, 0.99, False)  # under an earlier policy
    table = RouteTable(Config(gateway=GatewaySettings(data_dir=str(data_dir))),
                       on_change=lambda change: store.append("route_changes", change.to_record()))
    table.set(PATH, RoutePolicy(mode="canary", adapter="v1", share=10, threshold=0.8,
                                ramp={**RAMP, "window": 4, "min_samples": 4}), actor="test", reason="test")
    compared("old-1", 1, 0.95, True)  # slides out of the window of 4
    compared("low", 2, 0.5, False)  # a shadow answer under the threshold: not one the route serves
    compared("audit", 3, 0.4, True, kind="audit")  # an audited local answer counts whatever its confidence
    compared("wrong", 4, 0.9, False)
    compared("reviewed", 5, 0.9, False)
    compared("timeout", 6, 0.9, None)  # not compared
    compared("v0", 7, 0.9, False, adapter=f"{PATH}/v0")
    compared("unchecked", 7.5, 0.95, False, local_reason="invalid_output")  # above the threshold, not served
    compared("last", 8, 0.85, True)
    store.append("reviews", {"review_id": "r1", "ts": now, "shadow_id": "reviewed", "path": PATH,
                             "adapter": f"{PATH}/v1", "verdict": "upstream_wrong"})
    return table.revision(PATH)


def test_the_windows_are_rebuilt_from_the_store_with_their_verdicts(tmp_path):
    store = CaptureStore(tmp_path)
    store.open()
    revision = stored_history(tmp_path, store)
    evidence = RampEvidence()
    assert restore_from_store(evidence, RouteTable(Config(gateway=GatewaySettings(data_dir=str(tmp_path)))),
                              tmp_path) == 1
    assert evidence.counts(PATH, revision) == Counts(4, 3), "audit, wrong, reviewed (upstream wrong), last"
    assert evidence.overrule(PATH, "wrong", upstream_wrong=True) == (revision, Counts(4, 4))
    assert evidence.overrule(PATH, "old-1", upstream_wrong=True) is None, "outside the window"
    store.close()


def test_no_store_or_an_unreadable_one_starts_the_evidence_empty(tmp_path):
    table = RouteTable(Config(gateway=GatewaySettings(data_dir=str(tmp_path))))
    table.set(PATH, RoutePolicy(mode="shadow", adapter="v1"), actor="test", reason="test")
    assert restore_from_store(RampEvidence(), table, tmp_path) == 0
    store = CaptureStore(tmp_path)
    store.open()
    store.close()
    (tmp_path / "shadow" / PARQUET_DIR).mkdir(parents=True, exist_ok=True)
    (tmp_path / "shadow" / PARQUET_DIR / "broken.parquet").write_bytes(b"PAR1 not parquet PAR1")
    evidence = RampEvidence()
    assert restore_from_store(evidence, table, tmp_path) == 0
    assert evidence.counts(PATH, table.revision(PATH)) == Counts(0, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_restarted_gateway_reports_the_evidence_it_had(tmp_path, workers):
    data_dir = tmp_path / "data"
    store = CaptureStore(data_dir)
    store.open()
    stored_history(data_dir, store)
    store.close()
    process = gateway(tmp_path, data_dir, "--dev", "--workers", str(workers)).start()
    try:
        for _ in range(4):  # whichever worker answers
            reply = httpx.get(f"{process.url}/admin/routes/{PATH}", headers={"Authorization": "Bearer dev"}, timeout=10)
            assert {k: reply.json()["status"]["evidence"][k] for k in ("n", "agreed")} == {"n": 4, "agreed": 3}
    finally:
        process.stop()
