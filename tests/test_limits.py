"""Per-key rate limits and spend budgets: the bucket and ledger, and 429s from a real gateway."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest

from arbitrage.capture.store import CaptureStore
from arbitrage.errors import BudgetExceededError, RateLimitError, StoreError
from arbitrage.keys import KeyEntry, KeyLimits, KeyStore
from gateway.errors import handle_api_error
from gateway.limits import (
    SHARED_LIMITS_ENV,
    Quotas,
    SharedLimits,
    SpendLedger,
    TokenBucket,
    shared_limits_in,
    spend_from_store,
)
from tests.conftest import UPSTREAM_KEY
from tests.processes import arbitrage, at_once, gateway

MESSAGES = [{"role": "user", "content": "I am still waiting on my card?"}]


def key(**limits) -> KeyEntry:
    return KeyEntry("key_test", "test", "", "", **limits)


def test_bucket_allows_a_burst_of_its_size_then_refuses():
    bucket = TokenBucket(3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(20.0)  # one token every 60/3 s


def test_bucket_refills_at_its_rate():
    bucket = TokenBucket(60, now=0.0)
    for _ in range(60):
        bucket.take(0.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0.0


def test_bucket_never_holds_more_than_its_size():
    bucket = TokenBucket(2, now=0.0)
    assert [bucket.take(1000.0) for _ in range(3)][2] > 0


def test_rate_limit_error_says_when_to_retry():
    quotas = Quotas(data_dir=None)
    quotas.admit(key(rpm=1))
    with pytest.raises(RateLimitError) as info:
        quotas.admit(key(rpm=1))
    assert info.value.code == "rate_limit_exceeded" and info.value.headers() == {"Retry-After": "60"}


def test_a_changed_rpm_takes_effect():
    quotas = Quotas(data_dir=None)
    quotas.admit(key(rpm=1))
    quotas.admit(key(rpm=5))


def test_keys_without_limits_are_always_admitted():
    quotas = Quotas(data_dir=None)
    quotas.spend("key_test", 1e9)
    for _ in range(1000):
        quotas.admit(key())


@pytest.mark.parametrize("limit", ["budget_usd_day", "budget_usd_month"])
def test_spent_budget_refuses_the_next_request(limit):
    quotas = Quotas(data_dir=None)
    quotas.admit(key(**{limit: 0.01}))
    quotas.spend("key_test", 0.004)
    quotas.admit(key(**{limit: 0.01}))
    quotas.spend("key_test", 0.006)
    with pytest.raises(BudgetExceededError) as info:
        quotas.admit(key(**{limit: 0.01}))
    assert info.value.status_code == 429 and info.value.error_type == "insufficient_quota"
    assert int(info.value.headers()["Retry-After"]) > 0


def test_budgets_are_per_key():
    quotas = Quotas(data_dir=None)
    quotas.spend("key_other", 5.0)
    quotas.admit(key(budget_usd_day=1.0))


def test_unpriced_calls_spend_nothing():
    quotas = Quotas(data_dir=None)
    quotas.spend("key_test", None)
    assert quotas.limits.spent("key_test") == (0.0, 0.0)


def test_ledger_starts_a_new_day_and_a_new_month():
    ledger = SpendLedger()
    ledger.load({"k": 1.0}, {"k": 5.0}, datetime(2026, 1, 31, 23, tzinfo=UTC))
    assert ledger.spent("k", datetime(2026, 1, 31, 23, 59, tzinfo=UTC)) == (1.0, 5.0)
    ledger.add("k", 2.0, datetime(2026, 1, 31, 23, 59, tzinfo=UTC))
    assert ledger.spent("k", datetime(2026, 1, 31, 23, 59, tzinfo=UTC)) == (3.0, 7.0)
    assert ledger.spent("k", datetime(2026, 2, 1, 0, 1, tzinfo=UTC)) == (0.0, 0.0)


def test_ledger_keeps_the_month_across_days():
    ledger = SpendLedger()
    ledger.add("k", 2.0, datetime(2026, 3, 1, tzinfo=UTC))
    assert ledger.spent("k", datetime(2026, 3, 2, tzinfo=UTC)) == (0.0, 2.0)


# --- shared by the workers of one gateway (workers > 1) ----------------------------------------------

def test_workers_share_one_bucket_per_key(tmp_path):
    first, second = SharedLimits(tmp_path / "limits.sqlite"), SharedLimits(tmp_path / "limits.sqlite")
    assert [first.take("k", 3, 0.0), second.take("k", 3, 0.0), first.take("k", 3, 0.0)] == [0.0] * 3
    assert second.take("k", 3, 0.0) == pytest.approx(20.0), "the three tokens are gone, whoever took them"
    assert first.take("other", 3, 0.0) == 0.0, "each key has its own bucket"
    assert second.take("k", 3, 20.0) == 0.0, "refilled at rpm / 60 a second"
    assert first.take("k", 6, 20.0) == 0.0, "a changed rpm starts a full bucket"


def _take_tokens(path: str, tokens: int, start, queue) -> None:
    limits = SharedLimits(Path(path))
    start.wait()
    queue.put(sum(limits.take("k", 1000, now=5.0) == 0.0 for _ in range(tokens)))  # a stopped clock: no refill


def test_processes_taking_at_once_get_exactly_the_buckets_tokens(tmp_path):
    path = tmp_path / "limits.sqlite"
    SharedLimits(path).close()
    taken = at_once(_take_tokens, str(path), 700)
    assert sum(taken) == 1000, f"2,100 tries at a 1,000-token bucket took {taken}"


def test_workers_share_the_spend_and_it_starts_from_the_store(tmp_path):
    write_calls(tmp_path / "data", [("a", datetime.now(UTC), 0.25)])
    path = shared_limits_in(tmp_path, tmp_path / "data")
    try:
        assert os.environ[SHARED_LIMITS_ENV] == str(path)
        first, second = Quotas(None, shared=path), Quotas(None, shared=path)
        first.restore()  # the shared file has the spend already: nothing summed twice
        assert second.limits.spent("a") == (0.25, 0.25)
        first.spend("a", 0.5)
        assert second.limits.spent("a") == (0.75, 0.75)
        with pytest.raises(BudgetExceededError):
            second.admit(KeyEntry("a", "a", "", "", budget_usd_day=0.7))
    finally:
        os.environ.pop(SHARED_LIMITS_ENV, None)


def test_shared_limits_before_the_first_store_start_from_zero(tmp_path):
    path = shared_limits_in(tmp_path, tmp_path / "no-store-yet")
    os.environ.pop(SHARED_LIMITS_ENV, None)
    assert SharedLimits(path).spent("a") == (0.0, 0.0)


def test_a_broken_shared_file_refuses_to_admit_but_never_fails_a_finished_call(tmp_path, caplog):
    with pytest.raises(StoreError, match="the workers' shared limits .*missing"):
        SharedLimits(tmp_path / "missing" / "limits.sqlite")
    quotas = Quotas(None, shared=tmp_path / "limits.sqlite")
    quotas.limits.close()  # as if the file had gone bad under the gateway
    with pytest.raises(StoreError):
        quotas.admit(key(rpm=5))
    quotas.spend("key_test", 0.01)
    assert "the spend of key key_test was not counted" in caplog.text


def write_calls(data_dir, rows):
    store = CaptureStore(data_dir)
    store.open()
    for i, (key_id, ts, cost) in enumerate(rows):
        store.append("calls", {"request_id": f"r{i}", "ts": ts, "key_id": key_id, "cost_usd": cost})
    store.close()


def test_spend_is_summed_from_the_store_by_day_and_month(tmp_path):
    now = datetime(2026, 5, 20, 12, tzinfo=UTC)
    write_calls(tmp_path, [("a", datetime(2026, 5, 20, 1, tzinfo=UTC), 1.0), ("a", datetime(2026, 5, 2, tzinfo=UTC), 2.0),
                           ("a", datetime(2026, 4, 30, tzinfo=UTC), 4.0), ("b", datetime(2026, 5, 3, tzinfo=UTC), 0.5),
                           ("b", datetime(2026, 5, 20, tzinfo=UTC), None)])
    assert spend_from_store(tmp_path, now) == ({"a": 1.0}, {"a": 3.0, "b": 0.5})


def test_restore_without_a_store_starts_from_zero(tmp_path):
    quotas = Quotas(tmp_path / "missing")
    quotas.restore()
    assert quotas.limits.spent("a") == (0.0, 0.0)


def test_429_response_has_openai_shape_and_retry_after():
    response = handle_api_error(None, RateLimitError("slow down", code="rate_limit_exceeded", retry_after_s=1.2))
    assert response.status_code == 429 and response.headers["Retry-After"] == "2"
    assert response.content["error"]["type"] == "rate_limit_error"


# --- a real gateway ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(sim, tmp_path_factory):
    """A gateway whose keys have limits: returns (start, data_dir, {name: key})."""
    tmp = tmp_path_factory.mktemp("limited")
    data_dir = tmp / "data"
    keys = {name: arbitrage("keys", "create", name, *flags, "--data-dir", str(data_dir)).stdout.strip()
            for name, flags in {"rpm2": ("--rpm", "2"), "tiny": ("--budget-usd-day", "0.0000001"),
                                "free": ()}.items()}

    def start():
        return gateway(tmp, data_dir, "--upstream-url", f"{sim.url}/v1", env={"OPENAI_API_KEY": UPSTREAM_KEY}).start()

    process = start()
    yield process, start, data_dir, keys
    process.stop()


def client(process, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=process.url + "/v1", api_key=key, max_retries=0)


def test_rate_limited_key_gets_429_with_retry_after(limited):
    process, _, _, keys = limited
    for _ in range(2):
        client(process, keys["rpm2"]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        client(process, keys["rpm2"]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.code == "rate_limit_exceeded" and 1 <= int(info.value.response.headers["retry-after"]) <= 30


def test_other_keys_are_not_slowed_by_a_limited_one(limited):
    process, _, _, keys = limited
    for _ in range(3):
        client(process, keys["free"]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_spent_budget_is_refused_and_survives_a_restart(limited):
    process, start, data_dir, keys = limited
    client(process, keys["tiny"]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        client(process, keys["tiny"]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.code == "budget_exceeded" and "daily budget" in info.value.message
    process.stop()
    limited_again = start()
    try:
        response = httpx.post(limited_again.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {keys['tiny']}"},
                              json={"model": "gpt-4o-mini", "messages": MESSAGES})
        assert response.status_code == 429 and response.json()["error"]["type"] == "insufficient_quota"
    finally:
        limited_again.stop()


def test_refused_requests_are_not_recorded_or_forwarded(limited):
    _, _, data_dir, _ = limited
    rows = arbitrage("sql", "SELECT count(*) AS n FROM calls WHERE status_code = 429", "--json", "--data-dir",
                     str(data_dir)).stdout
    assert '"n": 0' in rows


def test_key_limits_round_trip_through_the_store(tmp_path):
    store = KeyStore(tmp_path)
    store.create("app", KeyLimits(rpm=10, budget_usd_month=3.5))
    store.update("app", rpm=None, budget_usd_day=1.0)
    [entry] = store.entries()
    assert (entry.rpm, entry.budget_usd_day, entry.budget_usd_month, entry.role) == (None, 1.0, 3.5, "client")
